"""spotwise.worker: the two programs that run on a node: the node agent (`agent/`) and the\ntraining runtime inside each training process (`runtime/`)."""
