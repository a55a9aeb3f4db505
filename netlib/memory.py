"""Inference memory: a liveness plan that reuses activation buffers, and the
byte counts a net needs (``Net.memory_estimate``).

Caffe gives every blob its own buffer for the whole life of the net.  For
inference most of them are dead most of the time: a blob is needed from the
layer that produces it to the last layer that reads it.  ``Net.reuse_memory()``
turns on the plan below; it is opt-in because it changes what ``net.blobs``
holds after a forward.

The plan (computed from the blob shapes, before a forward; redone when the
inputs' shapes or the kept blobs change):

1. *Sharing groups.*  Blobs that share one data buffer (a Split's tops and
   its bottom, Flatten/Reshape and their bottom, one-input Concat/Slice, an
   in-place layer's top, which is its bottom) form one group: their union is
   live from the first member's producer to the last member's last reader.
   Sharing is read off the buffers right after each layer's ``reshape``
   (a top whose buffer is its bottom's joins that bottom's group).  A top
   whose buffer belongs to a parameter or to the layer itself (Parameter,
   SoftmaxWithLoss's probability top) is *pinned*: never pooled.
2. *Kept groups* keep a buffer of their own, never reused: the net outputs,
   the ``keep`` blobs, every blob ever asked for by ``forward(blobs=[...])``
   or as the tops of a ``forward(end=...)``, the tops of layers without
   bottoms (the inputs, which the caller fills before the forward, and data
   layers' tops, e.g. labels), tops with a loss weight, pinned groups.
3. *Pool.*  One flat buffer (the arena).  Walking the layers in order, each
   other group gets, at its producer, a range of the arena (64-byte aligned):
   the smallest gap between the ranges of live groups that holds its count,
   else the end (growing the arena); its range is free again after its last
   reader ran.  A layer's tops are placed before its bottoms are released, so
   no layer reads and writes the same memory (except in place, which is one
   blob).
4. *Workspace.*  The column buffers of Convolution/Deconvolution (im2col) are
   scratch for the duration of one layer's call, overwritten by every use, so
   all those layers share one column buffer and one matrix buffer (the
   largest needed).

Contract with reuse on: after ``forward()`` the outputs and kept blobs hold
their values; every other blob in ``net.blobs`` may hold another blob's
values (read them with ``forward(blobs=[...])``, ``keep=`` or turn reuse
off).  ``forward(start=...)`` with a start other than the first layer, and
``backward()``, raise :class:`~netlib.errors.ConfigError` (the activations
they need were overwritten): call ``net.reuse_memory(False)`` and forward
again.  A layer must not rely on its top's contents from the previous
forward (no built-in layer does except data layers' tops, which are kept).
Numbers are unchanged: every layer computes the same values into another
buffer.  Single-threaded use only (as the net itself).
"""
from .blob import Blob
from .errors import ConfigError

#: Conv workspace attributes (netlib.builtin.vision _BaseConvolutionLayer's
#: reusable flat buffers; the layer reallocates one only when it is too small).
_CONV_WORKSPACE = ("_col_flat", "_mat_flat", "_img_flat")
#: The ones every use overwrites completely, so that all conv layers can share
#: one of each (the padded image buffer keeps zero borders: not shared).
_SHARED_WORKSPACE = ("_col_flat", "_mat_flat")


# -- helpers ----------------------------------------------------------------------
def _owner(arr):
    """The array that owns ``arr``'s memory (follows ``.base``)."""
    while getattr(arr, "base", None) is not None and hasattr(arr.base, "dtype"):
        arr = arr.base
    return arr


def _same_memory_key(arr):
    """(start address, elements): equal for two views of the same memory range
    (share_data shares the array itself; set_data stores a flat view)."""
    iface = getattr(arr, "__array_interface__", None)
    if iface is None:  # a device array: CuPy's (and any CUDA array's) interface
        iface = arr.__cuda_array_interface__
    return iface["data"][0], arr.size


def _nbytes(blob):
    return max(blob.count, 1) * blob.dtype.itemsize


#: Layer attributes the framework sets (Layer.Forward's reshape key holds the
#: bottoms' buffers): not the layer's own arrays.
_FRAMEWORK_ATTRS = frozenset(("_key_bufs", "_key_shapes", "_loss_vecs"))


def _internal_owners(layer):
    """Ids of the arrays a layer owns: its parameters' buffers and the arrays
    (or Blobs' data) it holds as attributes, one container level deep."""
    out = set()

    def add(value):
        if isinstance(value, Blob):
            if value._data_buf is not None:
                out.add(id(_owner(value._data_buf)))
        elif hasattr(value, "dtype") and hasattr(value, "shape"):
            out.add(id(_owner(value)))

    for b in layer.blobs:
        add(b)
    for name, value in vars(layer).items():
        if name in _FRAMEWORK_ATTRS:
            continue
        if isinstance(value, (list, tuple)):
            for v in value:
                add(v)
        elif isinstance(value, dict):
            for v in value.values():
                add(v)
        else:
            add(value)
    return out


def _conv_layers(net):
    from .builtin.vision import _BaseConvolutionLayer
    return [l for l in net.layers if isinstance(l, _BaseConvolutionLayer)]


def conv_workspace(layer):
    """{attribute: elements} of the scratch buffers a Convolution/Deconvolution
    forward allocates, from the geometry its last reshape set: the layer's
    own ``workspace_elements()`` (vision.py owns its buffers; tests/test_memory.py
    checks the figures against the arrays a forward leaves)."""
    return dict(layer.workspace_elements())


def _prod(values):
    n = 1
    for v in values:
        n *= int(v)
    return n


# -- the plan --------------------------------------------------------------------
class Plan:
    """The liveness plan of a net (see the module docstring).

    ``groups``: list of dicts (``members`` blob ids, ``root`` blob id,
    ``count`` elements, ``first``/``last`` layer indices, ``kept``),
    ``offset_of``: group index -> (offset, elements) in the pool, ``arena``:
    the pool's elements, ``itemsize``."""

    def __init__(self, net, keep_names):
        blobs = net._blob_list
        n_blobs = len(blobs)
        parent = list(range(n_blobs))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        first = [None] * n_blobs
        last = [-1] * n_blobs
        pinned = set()
        kept = set(net._blob_names.index(n) for n in keep_names if n in net.blobs)
        kept.update(net._output_ids)
        for i, (layer, bids, tids) in enumerate(zip(net.layers, net.bottom_ids, net.top_ids)):
            for b in bids:
                last[b] = i
            internal = None
            for j, t in enumerate(tids):
                last[t] = max(last[t], i)
                if first[t] is None:
                    first[t] = i
                if not bids:
                    kept.add(t)  # inputs and data layers' tops
                if layer.loss(j):
                    kept.add(t)
                if t in bids:
                    continue  # in place: the same blob
                buf = blobs[t]._data_buf
                if buf is None:
                    continue
                key = _same_memory_key(buf)
                joined = False
                for b in bids:
                    bbuf = blobs[b]._data_buf
                    if bbuf is not None and (bbuf is buf or _same_memory_key(bbuf) == key):
                        parent[find(t)] = find(b)
                        joined = True
                if not joined:
                    if internal is None:
                        internal = _internal_owners(layer)
                    if id(_owner(buf)) in internal:
                        pinned.add(t)
        for b in range(n_blobs):
            if first[b] is None:
                first[b] = 0  # never produced (cannot happen in a built net)
        groups, index = [], {}
        for b in range(n_blobs):
            r = find(b)
            if r not in index:
                index[r] = len(groups)
                groups.append({"members": [], "root": b, "count": 1, "first": first[b],
                               "last": last[b], "kept": False})
            g = groups[index[r]]
            g["members"].append(b)
            if first[b] < g["first"] or (first[b] == g["first"] and b < g["root"]):
                g["root"] = b
            g["first"] = min(g["first"], first[b])
            g["last"] = max(g["last"], last[b])
            g["count"] = max(g["count"], max(blobs[b].count, 1))
            if b in kept or b in pinned:
                g["kept"] = True
        self.groups = groups
        self.itemsize = net.dtype.itemsize
        self.keep_names = frozenset(keep_names)
        # Walk the layers: assign at the producer, release after the last reader.
        starts, ends = {}, {}
        for gi, g in enumerate(groups):
            if not g["kept"]:
                starts.setdefault(g["first"], []).append(gi)
                ends.setdefault(g["last"], []).append(gi)
        align = max(1, 64 // self.itemsize)  # offsets on 64-byte boundaries
        live, offset_of, arena = [], {}, 0   # live: sorted (offset, size) of live groups
        for i in range(len(net.layers)):
            for gi in starts.get(i, ()):
                need = -(-groups[gi]["count"] // align) * align
                best, end = None, 0
                for off, size in live:  # best fit among the gaps between live groups
                    if off - end >= need and (best is None or off - end < best[1]):
                        best = (end, off - end)
                    end = max(end, off + size)
                if best is None and arena - end >= need:
                    best = (end, arena - end)
                at = best[0] if best is not None else end
                arena = max(arena, at + need)
                offset_of[gi] = (at, need)
                live.append((at, need))
                live.sort()
            for gi in ends.get(i, ()):
                if gi in offset_of:
                    live.remove(offset_of[gi])
        self.offset_of = offset_of
        self.arena = arena

    def kept_bytes(self):
        return sum(g["count"] for g in self.groups if g["kept"]) * self.itemsize

    def pool_bytes(self):
        return self.arena * self.itemsize

    def all_bytes(self):
        return sum(g["count"] for g in self.groups) * self.itemsize


class MemoryReuse:
    """The state ``Net.reuse_memory()`` attaches to a net (``net._memory``)."""

    def __init__(self, net, keep=()):
        self.net = net
        self.keep = set(keep)
        unknown = [k for k in self.keep if k not in net.blobs]
        if unknown:
            raise ConfigError("reuse_memory(keep=...): net %r has no blob(s) %s" % (net.name, sorted(unknown)))
        self.plan = None
        self.slots = []
        self.workspace = []
        self._input_key = None

    def _source_shapes(self):
        net = self.net
        return tuple(net._blob_list[t]._shape for i, tids in enumerate(net.top_ids)
                     if not net.bottom_ids[i] for t in tids)

    def prepare(self, start, end, extra=()):
        """Called before a forward over layers ``start..end``: refuse what
        reuse cannot serve and (re)plan when the kept blobs or input shapes changed."""
        net = self.net
        if start != 0:
            raise ConfigError("forward from layer %d (%r) on a net with reuse_memory() on: the activations "
                              "it reads were reused by other blobs; forward from the first layer, or call "
                              "net.reuse_memory(False) first" % (start, net.layer_names[start]))
        grow = [n for n in extra if n not in self.keep]
        if end != len(net.layers) - 1:
            grow += [net._blob_names[t] for t in net.top_ids[end] if net._blob_names[t] not in self.keep]
        if grow:
            unknown = [n for n in grow if n not in net.blobs]
            if unknown:
                raise ConfigError("forward(blobs=...): net %r has no blob(s) %s" % (net.name, sorted(unknown)))
            self.keep.update(grow)
            self.plan = None
        if self.plan is None or self._source_shapes() != self._input_key:
            self.apply()

    def release(self):
        """Give every pooled blob its own buffer back (values are lost)."""
        net = self.net
        pooled = {id(s) for s in self.slots}
        for blob in net._blob_list:
            if blob._data_buf is not None and id(_owner(blob._data_buf)) in pooled:
                blob.release_data()
        shared = {id(w) for w in self.workspace}
        for layer in _conv_layers(net):
            for attr in _SHARED_WORKSPACE:
                if id(getattr(layer, attr, None)) in shared:
                    setattr(layer, attr, None)
        self.slots, self.workspace, self.plan = [], [], None

    def apply(self):
        net = self.net
        self.release()
        net.reshape()  # shares re-established on fresh (untouched) buffers
        plan = Plan(net, self.keep)
        xp, dtype = net.xp, net.dtype
        self.slots = [xp.zeros(max(plan.arena, 1), dtype=dtype)] if plan.arena else []
        for gi, (off, _) in plan.offset_of.items():
            buf = self.slots[0][off:off + plan.groups[gi]["count"]]
            for b in plan.groups[gi]["members"]:
                blob = net._blob_list[b]
                blob.use_buffer(buf)
        # one column buffer and one matrix buffer for every conv layer
        convs = _conv_layers(net)
        needs = [conv_workspace(l) for l in convs]
        self.workspace = []
        for attr in _SHARED_WORKSPACE:
            size = max([n.get(attr, 0) for n in needs] + [0])
            if size:
                buf = xp.empty(size, dtype=dtype)
                self.workspace.append(buf)
                for layer, need in zip(convs, needs):
                    if need.get(attr):
                        setattr(layer, attr, buf)
        for layer in net.layers:
            layer.invalidate_reshape()
        self.plan = plan
        self._input_key = self._source_shapes()


# -- estimate and measurement ---------------------------------------------------------
def estimate(net):
    """Bytes the net needs, from the shapes its last reshape set (no forward run).

    Keys (bytes, ints):

    * ``weights``: parameter blobs (a shared parameter once);
    * ``activations``: data buffers of the blobs, one per sharing group
      (Caffe's layout: every blob keeps its own);
    * ``activations_reused``: the same with ``reuse_memory()`` (kept blobs
      plus the pool), for the current kept set (``net.reuse_memory(keep=)``);
    * ``diffs``: diff buffers a forward allocates: 0 (netlib allocates diffs
      on first use: only a backward does);
    * ``diffs_backward``: what a backward over the layers that need one would
      add: a diff per blob and per parameter of those layers (an upper bound:
      blobs that share a diff are counted each);
    * ``workspace``: Convolution/Deconvolution scratch buffers (see
      :func:`conv_workspace`; other layers' scratch arrays, such as pooling
      indices or LRN buffers, are not counted);
    * ``workspace_reused``: the same with the column and matrix buffers shared
      by all conv layers (reuse on);
    * ``total``: weights + activations + workspace + diffs;
    * ``total_reused``: weights + activations_reused + workspace_reused.
    """
    item = net.dtype.itemsize
    weights = sum(_nbytes(b) for b, owner in zip(net._param_blobs, net._param_owner) if owner == -1)
    memory = getattr(net, "_memory", None)
    keep = memory.keep if memory is not None else ()
    plan = Plan(net, keep)
    ws = [conv_workspace(l) for l in _conv_layers(net)]
    workspace = sum(sum(n.values()) for n in ws) * item
    workspace_reused = (sum(max([n.get(a, 0) for n in ws] + [0]) for a in _SHARED_WORKSPACE)
                        + sum(v for n in ws for a, v in n.items() if a not in _SHARED_WORKSPACE)) * item
    diffs_backward = 0
    seen = set()
    for i, layer in enumerate(net.layers):
        if not net.layer_need_backward[i]:
            continue
        for b in net.bottom_ids[i] + net.top_ids[i]:
            if b not in seen:
                seen.add(b)
                diffs_backward += _nbytes(net._blob_list[b])
        for b in layer.blobs:
            diffs_backward += _nbytes(b)
    activations = plan.all_bytes()
    activations_reused = plan.kept_bytes() + plan.pool_bytes()
    return {"weights": weights, "activations": activations, "activations_reused": activations_reused,
            "diffs": 0, "diffs_backward": diffs_backward, "workspace": workspace,
            "workspace_reused": workspace_reused,
            "total": weights + activations + workspace,
            "total_reused": weights + activations_reused + workspace_reused}


def measure(net):
    """Bytes actually held now, by kind: ``weights`` (parameter data buffers),
    ``activations`` (distinct data buffers of the net's blobs that are not
    parameters), ``diffs`` (distinct diff buffers of blobs and parameters),
    ``workspace`` (distinct conv scratch buffers); each distinct
    underlying array counted once, at its full size."""
    def distinct(arrays):
        seen = {}
        for a in arrays:
            if a is not None:
                o = _owner(a)
                seen[id(o)] = o.nbytes
        return seen

    params = distinct(b._data_buf for b in net._param_blobs)
    acts = {k: v for k, v in distinct(b._data_buf for b in net._blob_list).items() if k not in params}
    diffs = distinct([b._diff_buf for b in net._blob_list] + [b._diff_buf for b in net._param_blobs])
    ws = distinct(getattr(l, attr, None) for l in _conv_layers(net) for attr in _CONV_WORKSPACE)
    return {"weights": sum(params.values()), "activations": sum(acts.values()),
            "diffs": sum(diffs.values()), "workspace": sum(ws.values())}


def format_estimate(est):
    """The estimate as aligned lines of MiB (for ``netlib time --memory``)."""
    order = ("weights", "activations", "activations_reused", "workspace", "workspace_reused", "diffs",
             "diffs_backward", "total", "total_reused")
    return ["%-20s %10.2f MiB" % (k, est[k] / 2.0 ** 20) for k in order]


__all__ = ["Plan", "MemoryReuse", "estimate", "measure", "conv_workspace", "format_estimate"]
