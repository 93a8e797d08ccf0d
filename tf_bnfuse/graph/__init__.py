"""The graph layer: GraphDef plumbing shared by the passes, the SavedModel I/O and verification."""

from tf_bnfuse.graph.index import *  # noqa: F401,F403  (split into modules in the next commits)
