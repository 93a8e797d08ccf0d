"""The phases of a SavedModel run, each a function that takes the parts it reads and returns the
part it makes (parts.py); api.fold_saved_model calls them in sequence."""
