"""One process among many: distributed start-up, the mesh and global batches (`sharding`), which
launcher started the process (`clusters`), the parent that reports how each process ended
(`supervisor`), and how a survivor ends when a peer died (`peers`)."""
