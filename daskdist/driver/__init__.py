"""The driver: code that runs in the client's process.

It plans nothing about the maths: it places shards (through
:mod:`daskdist.data`), hands each epoch to the strategy through an
:class:`~daskdist.driver.context.EpochContext`, watches the round outputs the
strategy tracks, and recovers when a worker is lost.

- :mod:`.trainer`: :class:`~daskdist.driver.trainer.Trainer`, the engine
  behind the estimators.
"""
