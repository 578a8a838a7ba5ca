"""The data layer: inputs in, shards on the workers.

- :mod:`.inputs` and :mod:`.validation`: numpy, dask, xarray, Zarr and
  dataframes to arrays, checked on the client from their metadata;
- :mod:`.sharding`: shard plans (random, sequential, stratified) and the
  hold-out split;
- :mod:`.sources`: where each shard is built and how (sent from the client,
  assembled from chunks on a worker, or streamed);
- :mod:`.shards` and :mod:`.streaming`: the shards themselves, on the workers.
"""
