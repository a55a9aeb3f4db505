"""netlib's random number generator (Caffe's ``Caffe::rng``).

One process-wide NumPy Generator serves fillers, Dropout, data shuffling and
every other draw, so ``set_random_seed`` makes a run reproducible and the
solver can save and restore the exact stream in its snapshots (resuming then
continues bit for bit).  Streams are not Caffe's boost::mt19937 streams: the
distributions match, the samples do not (nor can they across libraries).
"""
import json
import os

import numpy

_state = {"rng": None}


def set_random_seed(seed):
    """Seed the generator (pycaffe's ``caffe.set_random_seed``)."""
    _state["rng"] = numpy.random.Generator(numpy.random.PCG64(int(seed)))


def get_rng():
    """The process-wide Generator; seeded from the OS on first use."""
    if _state["rng"] is None:
        _state["rng"] = numpy.random.Generator(numpy.random.PCG64(int.from_bytes(os.urandom(8), "little")))
    return _state["rng"]


def get_state():
    """The generator state as a JSON string (stored in solver snapshots)."""
    return json.dumps(get_rng().bit_generator.state)


def set_state(text):
    """Restore a state produced by :func:`get_state`."""
    state = json.loads(text)
    bitgen = getattr(numpy.random, state["bit_generator"])()
    bitgen.state = state
    _state["rng"] = numpy.random.Generator(bitgen)
