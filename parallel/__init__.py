"""Everything that knows about more than one process: mesh, expert parallelism, ZeRO, pipelines."""
