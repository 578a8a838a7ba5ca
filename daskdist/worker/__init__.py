"""Code that runs on the workers: the bodies of daskdist's Dask tasks.

Every task is a pure function of its inputs (the model spec, a shard, a
training state and a :class:`~daskdist.worker.replica.RoundPlan`); what a
worker keeps between tasks (live replicas, error-feedback memory, pipeline
stages, a process group) is a cache, registered with :mod:`.runtime` so that
it is dropped with its run.
"""
