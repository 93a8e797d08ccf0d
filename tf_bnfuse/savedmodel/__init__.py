"""SavedModel I/O: check, load, freeze and write SavedModels; TF1 initializers, root functions, resources."""
