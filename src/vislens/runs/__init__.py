"""The run machinery every experiment stands on (a layer below vislens.experiments).

- rundir: RunDir, a result directory that resumes (config.json, parts, summary.json)
- handle: ModelHandle, what an experiment may read of the model it is given
- local: executor(vlm), which runs an experiment's units here (Local) or on a pool
- ray_pool: RayPool, the same units on Ray actors, and Models (here or a pool)
- ray_cluster: `--workers` / `--ray` checked before anything is loaded
"""
