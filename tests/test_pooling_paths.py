"""Pooling's execution paths, bit for bit against Caffe's loops.

netlib.builtin.pooling runs a window geometry on one of three paths: the
channels-last path (planes transposed to (H, W, rows) in chunks and blocks;
taken on numpy when some kernel offset covers only part of the top), the
direct path (strided NCHW views of batch chunks) and global reductions.  Each
is checked here against a per-window reference written from Caffe's CPU code
(pooling_layer.cpp), in the layer's own dtype so every rounding step is
Caffe's: MAX starts at -FLT_MAX with a strict ``>`` (first maximum in raster
order; NaN, -inf and -FLT_MAX itself never win; an empty window keeps
-FLT_MAX and mask -1), AVE sums in raster order from 0 and divides by the
pool size counted before clipping; backward adds, window after window in
raster order, each top diff (divided by the pool size for AVE) into the
bottom diff.  Forward, mask top and backward must be *identical* (not close)
on ties, -inf/NaN, padding, ceil/floor rounding, odd sizes and chunk
remainders, in float32 and float64.
"""
import numpy as np
import pytest
from google.protobuf import text_format

from netlib import accel
from netlib.blob import Blob
from netlib.builtin import pooling
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from xp_mode import ON_DEVICE, XP, host, host_only

FLT_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------
# Caffe's loops, per window
# --------------------------------------------------------------------------
def out_size(H, k, p, s, ceil_mode):
    q = (H + 2 * p - k) / s
    n = (int(np.ceil(q)) if ceil_mode else int(np.floor(q))) + 1
    return n


def caffe_pool(x, method, kh, kw, sh, sw, ph, pw, ceil_mode, dy=None):
    """(top, mask, bottom_diff) of Caffe's CPU Pooling, rounding in x.dtype."""
    dt = x.dtype.type
    N, C, H, W = x.shape
    PH, PW = out_size(H, kh, ph, sh, ceil_mode), out_size(W, kw, pw, sw, ceil_mode)
    if ph or pw:
        if (PH - 1) * sh >= H + ph:
            PH -= 1
        if (PW - 1) * sw >= W + pw:
            PW -= 1
    y = np.zeros((N, C, PH, PW), x.dtype)
    mask = np.full((N, C, PH, PW), -1.0, x.dtype)
    dx = np.zeros_like(x)
    dx2 = dx.reshape(N * C, H * W)
    rows = np.arange(N * C)
    for a in range(PH):
        for b in range(PW):
            hs, ws = a * sh - ph, b * sw - pw
            if method == "MAX":
                he, we = min(hs + kh, H), min(ws + kw, W)
                hs, ws = max(hs, 0), max(ws, 0)
                best = np.full((N, C), -FLT_MAX, x.dtype)
                arg = np.full((N, C), -1)
                for h in range(hs, he):
                    for w in range(ws, we):
                        v = x[:, :, h, w]
                        upd = v > best
                        best = np.where(upd, v, best)
                        arg = np.where(upd, h * W + w, arg)
                y[:, :, a, b] = best
                mask[:, :, a, b] = arg
                if dy is not None:
                    sel = arg.reshape(-1) >= 0
                    dx2[rows[sel], arg.reshape(-1)[sel]] += dy[:, :, a, b].reshape(-1)[sel]
            else:
                he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                size = dt((he - hs) * (we - ws))
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                acc = np.zeros((N, C), x.dtype)
                for h in range(hs, he):
                    for w in range(ws, we):
                        acc = acc + x[:, :, h, w]
                with np.errstate(divide="ignore", invalid="ignore"):
                    y[:, :, a, b] = acc / size
                    if dy is not None:
                        g = dy[:, :, a, b] / size
                for h in range(hs, he):
                    for w in range(ws, we):
                        if dy is not None:
                            dx[:, :, h, w] = dx[:, :, h, w] + g
    return y, mask, dx


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def params_text(method, kh, kw, sh, sw, ph, pw, ceil_mode, global_pooling=False):
    if global_pooling:
        body = "pool: %s global_pooling: true" % method
    else:
        body = ("pool: %s kernel_h: %d kernel_w: %d stride_h: %d stride_w: %d pad_h: %d pad_w: %d"
                % (method, kh, kw, sh, sw, ph, pw))
    if not ceil_mode:
        body += " round_mode: FLOOR"
    return 'name: "p" type: "Pooling" pooling_param { %s }' % body


def run_layer(text, x, phase, ntop, dy_fn, attrs=None):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    lay = create_layer(lp, phase=caffe_pb2.TRAIN if phase == "TRAIN" else caffe_pb2.TEST,
                       dtype=x.dtype.type, xp=XP)
    for k, v in (attrs or {}).items():
        setattr(lay, k, v)
    b = Blob(x.shape, dtype=x.dtype.type)
    b.data[...] = x
    tops = [Blob((), dtype=x.dtype.type) for _ in range(ntop)]
    lay.SetUp([b], tops)
    lay.Forward([b], tops)
    y = host(tops[0].data).copy()
    mask = host(tops[1].data).copy() if ntop > 1 else None
    dy = dy_fn(tops[0].shape)
    tops[0].diff[...] = dy
    b.diff[...] = 7                       # backward overwrites, never accumulates
    lay.Backward(tops, [True], [b])
    return lay, y, mask, dy, host(b.diff).copy()


def tie_heavy(rng, shape, dtype, specials=True):
    """Small integers (many ties), with -inf, NaN and -FLT_MAX sprinkled in."""
    x = rng.integers(-2, 3, size=shape).astype(dtype)
    if specials:
        flat = x.reshape(-1)
        n = flat.size
        flat[rng.choice(n, n // 10, replace=False)] = -np.inf
        flat[rng.choice(n, n // 20, replace=False)] = np.nan
        flat[rng.choice(n, n // 20, replace=False)] = -FLT_MAX
    return x


# Paths: attribute overrides on the layer, and whether the channels-last path must be taken.
PATHS = {
    "cl": ({}, True),
    "cl_chunks": ({"cl_chunk_bytes": 1, "cl_rows": (4, 4), "cl_block_pixels": 1, "cl_block_rows": (2, 2)},
                  True),
    "direct": ({"cl_max_plane": 0}, False),
    "direct_chunks": ({"cl_max_plane": 0, "chunk_bytes": 1}, False),
    # the compiled kernels of netlib.accel (Caffe's loops): everywhere, and by
    # the layer's rule (some forwards in NumPy, whose argmax backward then reads)
    "numba": ({"accel_forward_all": True}, None),
    "numba_rule": ({}, "rule"),
}


@pytest.fixture(autouse=True)
def _engine(request):
    """The "numba" path runs with netlib.accel on (skipped without numba);
    every other path with it off, so the NumPy paths stay tested."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    want = str(params.get("path")).startswith("numba")
    if want and not accel.available():
        pytest.skip("numba is not installed (the optional accelerator)")
    old = accel.set_enabled(want, everywhere=True)
    yield
    accel.set_enabled(old)

# (id, H, W, method, kh, kw, sh, sw, ph, pw, ceil)
GEOMS = [
    ("max3s2_ceil_clip", 9, 8, "MAX", 3, 3, 2, 2, 0, 0, True),       # last windows overhang
    ("max3s2_exact", 7, 9, "MAX", 3, 3, 2, 2, 0, 0, True),           # every window inside
    ("max3s2_pad1", 8, 7, "MAX", 3, 3, 2, 2, 1, 1, True),
    ("max3s1_pad1", 6, 5, "MAX", 3, 3, 1, 1, 1, 1, True),            # GoogLeNet's inception pool
    ("max2s2_odd", 7, 5, "MAX", 2, 2, 2, 2, 0, 0, True),
    ("max2s2_even", 6, 8, "MAX", 2, 2, 2, 2, 0, 0, True),           # disjoint windows cover the image
    ("max2s3_floor", 8, 7, "MAX", 2, 2, 3, 3, 0, 0, False),         # disjoint, pixels in no window
    ("max_rect_pad", 7, 6, "MAX", 3, 2, 2, 1, 1, 0, True),
    ("max_floor_pad", 7, 7, "MAX", 3, 3, 2, 2, 1, 1, False),
    ("max_s_gt_k", 5, 7, "MAX", 1, 1, 3, 3, 0, 0, True),             # empty windows past the image
    ("max2s2_pad1_clip", 5, 5, "MAX", 2, 2, 2, 2, 1, 1, True),       # Caffe drops the last window
    ("ave3s2_ceil_clip", 9, 8, "AVE", 3, 3, 2, 2, 0, 0, True),
    ("ave3s2_exact", 7, 7, "AVE", 3, 3, 2, 2, 0, 0, True),
    ("ave3s2_pad1", 4, 6, "AVE", 3, 3, 2, 2, 1, 1, True),            # overhang past H+pad
    ("ave2s2_odd", 7, 5, "AVE", 2, 2, 2, 2, 0, 0, True),
    ("ave2s2_even", 8, 6, "AVE", 2, 2, 2, 2, 0, 0, True),            # DenseNet's transition pool
    ("ave_rect_pad", 7, 6, "AVE", 3, 2, 2, 1, 1, 1, True),
    ("ave_floor", 8, 8, "AVE", 3, 3, 2, 2, 0, 0, False),
    ("ave7s1_7x7", 7, 7, "AVE", 7, 7, 1, 1, 0, 0, True),             # GoogLeNet pool5: one window
    ("max7s1_7x7", 7, 7, "MAX", 7, 7, 1, 1, 0, 0, True),             # one window: the global path
]


def check(geom, path, dtype, phase, x_fn, dy_fn=None, ntop=None):
    _, H, W, method, kh, kw, sh, sw, ph, pw, ceil_mode = geom
    attrs, want_cl = PATHS[path]
    rng = np.random.default_rng(hash((geom[0], path, phase)) % 2 ** 32)
    x = x_fn(rng, (3, 5, H, W), dtype)
    if dy_fn is None:
        def dy_fn(shape):
            return rng.standard_normal(shape).astype(dtype)
    if ntop is None:
        ntop = 2 if method == "MAX" else 1
    text = params_text(method, kh, kw, sh, sw, ph, pw, ceil_mode)
    lay, y, mask, dy, dx = run_layer(text, x, phase, ntop, dy_fn, attrs)
    # (on a device module neither the compiled kernels nor the channels-last
    # path may run: both are NumPy-only; the direct path serves every case)
    if want_cl is None:
        assert lay._argmax_flat == (method == "MAX" and not lay._whole and not ON_DEVICE)  # the kernels ran
    elif want_cl == "rule":
        pass
    elif not lay._whole:
        assert lay._cl_ok(x.shape) == (want_cl and lay._partial and not ON_DEVICE)
    ry, rmask, rdx = caffe_pool(x, method, kh, kw, sh, sw, ph, pw, ceil_mode, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, ry)
    if mask is not None:
        np.testing.assert_array_equal(mask, rmask)
    np.testing.assert_array_equal(dx, rdx)
    assert not np.signbit(dx[dx == 0]).any()        # Caffe's 0 + g never leaves a -0
    return lay


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("geom", GEOMS, ids=[g[0] for g in GEOMS])
def test_paths_match_caffe_bit_for_bit(geom, path, dtype):
    def x_fn(rng, shape, dt):
        return rng.standard_normal(shape).astype(dt)
    check(geom, path, dtype, "TRAIN", x_fn)


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("geom", [g for g in GEOMS if g[3] == "MAX"], ids=lambda g: g[0])
def test_max_ties_inf_nan_first_in_raster_order(geom, path, phase):
    # TEST with one top: forward without argmax, backward recomputes it from the bottom
    ntop = 2 if phase == "TRAIN" else 1
    check(geom, path, np.float32, phase, tie_heavy, ntop=ntop)


@pytest.mark.parametrize("path", list(PATHS))
def test_max_all_empty_windows(path):
    # every real pixel is -inf / NaN / -FLT_MAX: top -FLT_MAX, mask -1, no gradient anywhere
    geom = ("max3s2_ceil_clip", 9, 8, "MAX", 3, 3, 2, 2, 0, 0, True)

    def x_fn(rng, shape, dt):
        return rng.choice(np.array([-np.inf, np.nan, -FLT_MAX], dt), size=shape)
    lay = check(geom, path, np.float32, "TRAIN", x_fn)
    assert lay is not None


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("geom", [g for g in GEOMS if g[3] == "AVE"], ids=lambda g: g[0])
def test_ave_ties_and_signed_zero(geom, path):
    def x_fn(rng, shape, dt):
        x = tie_heavy(rng, shape, dt, specials=False) * dt(0.1)
        x.reshape(-1)[::7] = -0.0
        return x
    check(geom, path, np.float32, "TRAIN", x_fn)
    # a window of -0.0 only: Caffe's 0 + (-0) gives +0, on every path
    _, H, W, method, kh, kw, sh, sw, ph, pw, ceil_mode = geom
    x = np.full((2, 3, H, W), -0.0, np.float32)
    _, y, _, _, _ = run_layer(params_text(method, kh, kw, sh, sw, ph, pw, ceil_mode), x, "TEST", 1,
                              lambda s: np.zeros(s, np.float32), PATHS[path][0])
    assert not np.signbit(y).any()


@pytest.mark.parametrize("path", ["cl", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method, dtype, path):
    rng = np.random.default_rng(3)
    x = tie_heavy(rng, (3, 4, 5, 6), dtype, specials=(method == "MAX"))
    x[0, 0] = -np.inf                       # a plane with no winner
    ntop = 2 if method == "MAX" else 1
    _, y, mask, dy, dx = run_layer(params_text(method, 0, 0, 1, 1, 0, 0, True, global_pooling=True), x,
                                   "TRAIN", ntop, lambda s: rng.standard_normal(s).astype(dtype))
    ry, rmask, rdx = caffe_pool(x, method, 5, 6, 1, 1, 0, 0, True, dy)
    np.testing.assert_array_equal(y, ry)            # AVE: Caffe's running sum, not a pairwise sum
    if method == "MAX":
        np.testing.assert_array_equal(mask, rmask)
    np.testing.assert_array_equal(dx, rdx)
    assert not np.signbit(dx[dx == 0]).any()         # Caffe's 0 + g: no -0 in the bottom diff


@pytest.mark.parametrize("path", ["cl", "numba", "numba_rule"])
def test_paths_reuse_buffers_across_shapes(path):
    # one layer, bottoms of changing batch and size: plans and scratch buffers follow
    text = params_text("MAX", 3, 3, 2, 2, 0, 0, True)
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    lay = create_layer(lp, phase=caffe_pb2.TRAIN, dtype=np.float32, xp=XP)
    rng = np.random.default_rng(5)
    b, t = Blob((1, 1, 4, 4)), [Blob(()), Blob(())]
    lay.SetUp([b], t)
    for shape in [(2, 3, 9, 8), (4, 3, 9, 8), (2, 2, 12, 11), (2, 3, 9, 8)]:
        x = tie_heavy(rng, shape, np.float32)
        b.reshape(*shape)
        lay.reshape([b], t)
        b.data[...] = x
        lay.Forward([b], t)
        dy = rng.standard_normal(t[0].shape).astype(np.float32)
        t[0].diff[...] = dy
        lay.Backward(t, [True], [b])
        ry, rmask, rdx = caffe_pool(x, "MAX", 3, 3, 2, 2, 0, 0, True, dy)
        np.testing.assert_array_equal(host(t[0].data), ry)
        np.testing.assert_array_equal(host(t[1].data), rmask)
        np.testing.assert_array_equal(host(b.diff), rdx)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("geom", [g for g in GEOMS if g[0] in ("max3s2_ceil_clip", "max3s2_exact", "max2s2_even",
                                                               "ave3s2_pad1", "ave7s1_7x7")], ids=lambda g: g[0])
def test_empty_batch(geom, path):
    _, H, W, method, kh, kw, sh, sw, ph, pw, ceil_mode = geom
    x = np.zeros((0, 3, H, W), np.float32)
    for phase in ("TRAIN", "TEST"):
        _, y, _, _, dx = run_layer(params_text(method, kh, kw, sh, sw, ph, pw, ceil_mode), x, phase, 1,
                                   lambda s: np.zeros(s, np.float32), PATHS[path][0])
        assert y.shape[0] == 0 and dx.shape == x.shape


@host_only("the channels-last path is a NumPy-only path; a device module takes the direct path")
def test_channels_last_only_where_it_pays():
    def layer(params, shape):
        lp = text_format.Parse('name: "p" type: "Pooling" pooling_param { %s }' % params,
                               caffe_pb2.LayerParameter())
        lay = create_layer(lp, phase=caffe_pb2.TRAIN, dtype=np.float32, xp=XP)
        b, t = Blob(shape), [Blob(())]
        lay.SetUp([b], t)
        return lay._cl_ok(shape)
    assert layer("pool: MAX kernel_size: 3 stride: 2", (1, 2, 32, 32))        # ceil overhang: partial views
    assert layer("pool: MAX kernel_size: 3 stride: 1 pad: 1", (1, 2, 28, 28))
    assert not layer("pool: MAX kernel_size: 3 stride: 2", (1, 2, 27, 27))    # every view covers the top
    assert not layer("pool: AVE kernel_size: 2 stride: 2", (1, 2, 56, 56))
    assert not layer("pool: MAX kernel_size: 3 stride: 2", (1, 2, 112, 112))  # large plane: direct
    assert not layer("pool: AVE global_pooling: true", (1, 2, 7, 7))
    assert pooling.PoolingLayer.cl_max_plane >= 56 * 56


class _Arrays:
    """A stand-in for a Blob whose data / diff are arbitrary (non-contiguous) arrays."""

    def __init__(self, data, diff):
        self.data, self.diff = data, diff


@pytest.mark.parametrize("geom", [g for g in GEOMS if g[0] in ("max3s2_ceil_clip", "max3s2_exact", "ave3s2_pad1",
                                                               "ave2s2_even", "ave7s1_7x7", "max7s1_7x7")],
                         ids=lambda g: g[0])
@pytest.mark.parametrize("path", ["cl", "numba"])         # numba: falls back to NumPy on strided views
def test_non_contiguous_arrays(geom, path):
    # forward / backward write through views into the caller's arrays, whatever their strides
    _, H, W, method, kh, kw, sh, sw, ph, pw, ceil_mode = geom
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5, H, W)).astype(np.float32)
    lay, y_ref, _, dy, dx_ref = run_layer(params_text(method, kh, kw, sh, sw, ph, pw, ceil_mode), x, "TRAIN", 1,
                                          lambda s: rng.standard_normal(s).astype(np.float32))

    def strided(a):
        big = XP.full(a.shape[:-1] + (2 * a.shape[-1],), 5.0, np.float32)
        v = big[..., ::2]
        v[...] = a
        return v
    bottom = _Arrays(strided(x), strided(np.zeros_like(x)))
    top = _Arrays(strided(np.zeros_like(y_ref)), strided(dy))
    assert not bottom.data.flags.c_contiguous and not top.data.flags.c_contiguous
    lay.forward([bottom], [top])
    np.testing.assert_array_equal(host(top.data), y_ref)
    lay.backward([top], [True], [bottom])
    np.testing.assert_array_equal(host(bottom.diff), dx_ref)


@pytest.mark.parametrize("path", ["numba"])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_engine_switch_between_forward_and_backward(method, path):
    # an argmax made by one engine is never read by the other: switching the
    # accelerator off (or on) between forward and backward recomputes it
    rng = np.random.default_rng(17)
    x = tie_heavy(rng, (2, 3, 9, 8), np.float32, specials=(method == "MAX"))
    text = params_text(method, 3, 3, 2, 2, 0, 0, True)
    for first, second in ((True, False), (False, True)):
        lp = text_format.Parse(text, caffe_pb2.LayerParameter())
        lay = create_layer(lp, phase=caffe_pb2.TRAIN, dtype=np.float32, xp=XP)
        b, t = Blob(x.shape), [Blob(())]
        b.data[...] = x
        lay.SetUp([b], t)
        accel.set_enabled(first)
        lay.Forward([b], t)
        dy = rng.standard_normal(t[0].shape).astype(np.float32)
        t[0].diff[...] = dy
        accel.set_enabled(second)
        lay.Backward(t, [True], [b])
        ry, _, rdx = caffe_pool(x, method, 3, 3, 2, 2, 0, 0, True, dy)
        np.testing.assert_array_equal(host(t[0].data), ry)
        np.testing.assert_array_equal(host(b.diff), rdx)


def test_accelerator_switch_and_status(monkeypatch):
    old = accel.set_enabled(False)
    try:
        assert accel.kernels() is None and not accel.enabled()
        assert "off" in accel.status() or "not installed" in accel.status()
        accel.set_enabled(True)
        assert accel.enabled() == accel.available()
        assert (accel.kernels() is not None) == accel.available()
    finally:
        accel.set_enabled(old)


def test_inference_stays_on_numpy_unless_asked():
    # TEST-phase layers do not load numba's runtime (~90 MB resident) by default
    if not accel.available():
        pytest.skip("numba is not installed (the optional accelerator)")
    x = np.zeros((4, 4), np.float32)
    old, old_inf = accel.set_enabled(True), accel.set_inference(False)
    try:
        assert accel.kernels_for(x, phase=0) is not None
        assert accel.kernels_for(x, phase=1) is None
        accel.set_inference(True)
        assert accel.kernels_for(x, phase=1) is not None
        assert accel.kernels_for(x[:, ::2], phase=0) is None           # strided: NumPy
        assert accel.kernels_for(x.astype(np.int32), phase=0) is None  # not float
    finally:
        accel.set_enabled(old)
        accel.set_inference(old_inf)


def test_test_phase_force_backward_uses_this_inputs_argmax():
    """TEST phase with force_backward: forward keeps no argmax, backward recomputes it; the next forward
    (new data, same shapes) must not leave the previous input's argmax in use (it did: a stale route)."""
    import netlib
    from netlib.proto import caffe_pb2
    text = """force_backward: true
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
    layer { name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }"""
    net = netlib.Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
        net.blobs["x"].data[...] = x
        net.forward()
        net.blobs["y"].diff[...] = 1
        net.backward()
        windows = x.reshape(2, 3, 3, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 3, 3, 4)
        first = windows.argmax(axis=-1)  # first maximum in raster order, as Caffe
        ref = np.zeros((2, 3, 3, 3, 4), np.float32)
        np.put_along_axis(ref, first[..., None], 1, axis=-1)
        ref = ref.reshape(2, 3, 3, 3, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 6, 6)
        from netlib import backend
        np.testing.assert_array_equal(backend.to_numpy(net.blobs["x"].diff), ref)
