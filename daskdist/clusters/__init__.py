"""Which Dask cluster a fit runs on: the embedded cluster, and cluster specs.

:func:`embedded_cluster` starts the local cluster daskdist uses when it is
given none, and :func:`cluster_client` picks the client of one fit
(:mod:`.embedded`).

Cluster specs are YAML files that say which Dask cluster a fit runs on.

A spec names a ``backend`` and gives that back end's options in a section of
its own; :func:`load_cluster_spec` reads and validates one before anything
starts, :meth:`ClusterSpec.dry_run` shows what would be started, and
:meth:`ClusterSpec.connect` starts it (or connects to it) and yields a client.

=============  ==============================================  ==============
backend        what starts                                     options in
=============  ==============================================  ==============
``local``      :func:`daskdist.clusters.embedded.embedded_cluster`       ``local``
``local-cuda`` ``dask_cuda.LocalCUDACluster``, one worker/GPU  ``cuda``
``ssh``        :func:`distributed.deploy.ssh.SSHCluster`       ``ssh``
``slurm``      ``dask_jobqueue.SLURMCluster``                  ``jobqueue``
``pbs``        ``dask_jobqueue.PBSCluster``                    ``jobqueue``
``kubernetes`` ``dask_kubernetes.operator.KubeCluster``        ``kubernetes``
``address``    nothing: connects to the scheduler ``address``  (top level)
=============  ==============================================  ==============

Keys shared by the back ends: ``workers: N`` starts a fixed number of workers
(``cluster.scale(N)``); ``adapt: {minimum, maximum}`` lets Dask's adaptive
scaling add workers under load and retire idle ones gracefully (their data
moves to the others first); ``timeout`` bounds the wait for the first workers;
``tls`` encrypts the cluster's connections, ``true`` with throw-away
certificates, or ``{ca_file, cert, key}`` with your own.

Spec names resolve to a file in this order: a path to a ``.yaml`` file; then
``./cluster_specs/NAME.yaml`` in the working directory; then the copy of the
shipped spec packaged with daskdist (``daskdist/cluster_specs/``).

The modules of this package:

- :mod:`.spec`: :class:`ClusterSpec` and :func:`load_cluster_spec` (finding,
  reading, overriding and validating a spec);
- :mod:`.backends`: one module per back end family, each a
  :class:`~.backends.base.Backend` with its schema, dry run and start;
- :mod:`.schema`: the pieces of the back ends' schemas;
- :mod:`.scaling` and :mod:`.tls`: the ``workers`` / ``adapt`` and ``tls`` keys;
- :mod:`.errors`: :class:`ClusterSpecError`.
"""

from __future__ import annotations

from .backends.base import SCHEDULER_PLACEHOLDER as SCHEDULER_PLACEHOLDER
from .embedded import cluster_client, embedded_cluster
from .errors import ClusterSpecError
from .spec import DEFAULT_SPEC, ClusterSpec, load_cluster_spec
from .spec import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from .spec import PACKAGED_SPECS as PACKAGED_SPECS

__all__ = ["DEFAULT_SPEC", "ClusterSpec", "ClusterSpecError", "load_cluster_spec",
           "cluster_client", "embedded_cluster"]
