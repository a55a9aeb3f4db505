"""The base of Caffe's prefetching data layers (Data, ImageData, WindowData).

A subclass implements two hooks:

* ``data_setup(top)``: open its source, shape the tops (from the first item,
  as Caffe does) and set ``self.batch_size``;
* ``load_batch(b, rng)``: build batch ``b`` (0, 1, 2, ... since the start of
  reading) and return ``(data, labels)`` as NumPy arrays, ``data`` of shape
  (N, C, H, W) in the layer's dtype.  It runs on worker threads, so it may
  read only state fixed at setup; everything that varies comes from ``b`` and
  ``rng``, a generator seeded by (layer seed, b).

The layer draws its seed from netlib's generator at setup
(``netlib.set_random_seed`` makes runs repeatable) and keeps the index of
the next batch; both form ``state_dict()``, which solver snapshots store, so
a resumed run reads exactly the batches it would have read.
"""
import weakref

import numpy

from ..errors import ConfigError
from .. import forward_mode
from .. import second_order
from ..layer import Layer
from ..parallel import shard
from ..random import get_rng
from .prefetch import BufferPool, Prefetcher
from .transformer import DataTransformer


def _stop(prefetcher):
    # Garbage collection may run this on a worker thread: never wait there.
    prefetcher.stop(wait=False)


class PrefetchingDataLayer(Layer):
    """Tops: data (N, C, H, W) and, optionally, label (N,).  No bottoms, no
    backward.  Batches are prepared ``data_param.prefetch`` (default 4) ahead
    by background threads (:mod:`netlib.data.prefetch`)."""

    exact_num_bottom_blobs = 0
    min_top_blobs = 1
    max_top_blobs = 2

    jvp = forward_mode.zero_jvp  # d top = 0 (data layers)
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

    def setup(self, bottom, top):
        self.output_labels = len(top) == 2
        self.transformer = DataTransformer(self.layer_param.transform_param, self.phase, self.dtype,
                                           where=self.describe())
        # Like Caffe's InitRand, draw from netlib's generator only when the
        # layer makes random choices (other draws, e.g. fillers, stay put).
        self.seed = int(get_rng().integers(0, 2 ** 63)) if self.needs_rand() else 0
        self.batch = 0
        self.buffers = BufferPool()
        self.shard_rank, self.shard_count = shard(self.phase)   # data-parallel: this rank's share
        self.data_setup(top)
        if self.batch_size <= 0:
            self.fail("batch_size must be positive (got %d)" % self.batch_size, error=ConfigError)
        if self.output_labels:
            top[1].reshape(self.batch_size)
        self._prefetcher = None
        self._start()

    def needs_rand(self):
        """Whether batches involve random choices (random crops or mirrors
        here; subclasses add shuffling, skipping, window sampling)."""
        t = self.layer_param.transform_param
        return bool(t.mirror or (t.crop_size and self.phase == 0))

    def data_setup(self, top):
        """Open the source, shape the tops, set ``self.batch_size``."""
        self.fail("class %s does not define data_setup(top)" % type(self).__name__)

    def load_batch(self, b, rng):
        """Return ``(data, labels)`` of batch ``b`` (see the module docstring)."""
        self.fail("class %s does not define load_batch(b, rng)" % type(self).__name__)

    def batch_rng(self, b, stream=0, per_rank=False):
        """The generator of batch ``b`` (``stream`` separates independent uses).
        ``per_rank``: in a data-parallel run each rank gets its own (the
        per-item choices: crops, mirrors, windows); shuffles and skips stay
        common to all ranks, which share one read order."""
        key = [self.seed, stream, b]
        if per_rank and self.shard_count > 1:
            key += [self.shard_rank, self.shard_count]
        return numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence(key)))

    def _make(self, b):
        return self.load_batch(b, self.batch_rng(b, per_rank=True))

    def _start(self):
        self._stop_prefetch()
        self.open_source()
        depth = int(self.layer_param.data_param.prefetch)
        ref = weakref.ref(self)  # the threads must not keep the layer alive

        def make(b):
            layer = ref()
            if layer is None:
                raise RuntimeError("the data layer was deleted")
            return layer._make(b)

        self._prefetcher = Prefetcher(make, start=self.batch, depth=depth, name=self.name)
        self._finalizer = weakref.finalize(self, _stop, self._prefetcher)
        self._prefetcher.start()

    def _stop_prefetch(self):
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None and finalizer.detach() is not None:
            self._prefetcher.stop(wait=True)
        self._finalizer = None
        self._prefetcher = None

    def open_source(self):
        """Hook: reopen what :meth:`close_source` released (a closed layer
        that runs forward again continues where it stopped)."""

    def close_source(self):
        """Hook: release files and databases."""

    def close(self):
        """Stop the prefetch threads and release the source (both also
        happen when the layer is garbage-collected)."""
        self._stop_prefetch()
        self.close_source()

    def reshape(self, bottom, top):
        """The tops are shaped by each batch in forward."""

    def forward(self, bottom, top):
        if self._prefetcher is None:
            self._start()
        data, labels = self._prefetcher.next()
        self.batch += 1
        top[0].reshape(data.shape)
        if self.xp is numpy:
            # Hand the batch's buffer to the top and take the top's old buffer
            # for a later batch, as Caffe's set_cpu_data does: no copy.
            old = top[0].set_data(data)
            if old is not None and old.size == data.size:
                self.buffers.give(old.reshape(data.shape))
        else:
            top[0].data[...] = self.xp.asarray(data)
            self.buffers.give(data)
        if self.output_labels:
            top[1].reshape(labels.shape)
            top[1].data[...] = self.xp.asarray(labels)

    def backward(self, top, propagate_down, bottom):
        """Data layers have no backward."""

    def allow_force_backward(self, bottom_index):
        return False

    # -- resumable position --------------------------------------------------------------
    def state_dict(self):
        """Seed and the index of the next batch: all a resume needs."""
        return {"seed": int(self.seed), "batch": int(self.batch)}

    def load_state_dict(self, state):
        from ..errors import WeightsError
        try:
            seed, batch = int(state["seed"]), int(state["batch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError("%s: malformed reader state (%s: %s)"
                               % (self.describe(), type(exc).__name__, exc)) from None
        if batch < 0:
            raise WeightsError("%s: saved batch index %d is negative" % (self.describe(), batch))
        self._stop_prefetch()
        self.seed, self.batch = seed, batch
        self.state_loaded()
        self._start()

    def state_loaded(self):
        """Hook: recompute what depends on the seed (e.g. a random skip)."""
