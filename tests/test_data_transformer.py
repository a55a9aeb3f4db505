"""The data transformer against a naive per-pixel reference (Caffe's loops),
and the statistics of its random crops and mirrors."""
import numpy
import pytest

from netlib.data.transformer import DataTransformer
from netlib.errors import ConfigError, ShapeError
from netlib.files import write_binary_proto
from netlib.proto import caffe_pb2


def naive_transform(item, crop, h_off, w_off, mirror, scale, mean=None, mean_values=None):
    """Caffe's DataTransformer::Transform(Datum) loop, one pixel at a time, in float32."""
    c, h, w = item.shape
    oh, ow = (crop, crop) if crop else (h, w)
    out = numpy.zeros((c, oh, ow), numpy.float32)
    scale = numpy.float32(scale)
    for ch in range(c):
        for y in range(oh):
            for x in range(ow):
                value = numpy.float32(item[ch, h_off + y, w_off + x])
                if mean is not None:
                    value = numpy.float32(value - mean[ch, h_off + y, w_off + x])
                elif mean_values is not None:
                    mv = mean_values[0] if len(mean_values) == 1 else mean_values[ch]
                    value = numpy.float32(value - numpy.float32(mv))
                tx = ow - 1 - x if mirror else x
                out[ch, y, tx] = numpy.float32(value * scale)
    return out


def make_param(**kw):
    p = caffe_pb2.TransformationParameter()
    for k, v in kw.items():
        if k == "mean_value":
            p.mean_value.extend(v)
        else:
            setattr(p, k, v)
    return p


def write_mean(path, mean):
    proto = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    proto.data.extend(mean.astype(numpy.float32).ravel().tolist())
    write_binary_proto(str(path), proto)
    return str(path)


CASES = [
    dict(),
    dict(scale=0.00390625),
    dict(crop_size=5),
    dict(crop_size=4, scale=0.5),
    dict(crop_size=6, mean_value=[10.5]),
    dict(crop_size=3, mean_value=[104.0, 117.0, 123.0]),
    dict(mean_value=[3.25], scale=0.017),
    dict(crop_size=5, mean_file=True, scale=0.25),
    dict(mean_file=True),
    dict(crop_size=7, mean_file=True),  # crop = H: offset 0
]


@pytest.mark.parametrize("case", CASES, ids=[",".join("%s=%s" % kv for kv in c.items()) or "plain"
                                            for c in CASES])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_test_phase_matches_naive_reference(tmp_path, case, dtype):
    rng = numpy.random.default_rng(3)
    n, c, h, w = 4, 3, 7, 9
    batch = rng.integers(0, 256, size=(n, c, h, w)).astype(dtype)
    if dtype == "float32":
        batch += rng.random(batch.shape).astype(numpy.float32)
    case = dict(case)
    mean = None
    if case.pop("mean_file", False):
        mean = (rng.random((c, h, w)) * 255).astype(numpy.float32)
        case["mean_file"] = write_mean(tmp_path / "mean.binaryproto", mean)
    t = DataTransformer(make_param(**case), caffe_pb2.TEST)
    out = t(batch, numpy.random.default_rng(0))
    crop = case.get("crop_size", 0)
    h_off, w_off = ((h - crop) // 2, (w - crop) // 2) if crop else (0, 0)
    for i in range(n):
        ref = naive_transform(batch[i], crop, h_off, w_off, False, case.get("scale", 1.0), mean,
                              case.get("mean_value"))
        numpy.testing.assert_array_equal(out[i], ref)


def test_mirror_and_random_crop_match_reference_for_drawn_choices(tmp_path):
    rng = numpy.random.default_rng(5)
    batch = rng.integers(0, 256, size=(16, 3, 8, 10)).astype(numpy.uint8)
    mean = (rng.random((3, 8, 10)) * 255).astype(numpy.float32)
    t = DataTransformer(make_param(crop_size=5, mirror=True, scale=0.5,
                                   mean_file=write_mean(tmp_path / "m.binaryproto", mean)), caffe_pb2.TRAIN)
    h_off, w_off, mirror = t.draw(numpy.random.default_rng(11), 16, 8, 10)
    assert mirror.any() and not mirror.all()
    out = t.apply(batch, h_off, w_off, mirror)
    for i in range(16):
        ref = naive_transform(batch[i], 5, h_off[i], w_off[i], mirror[i], 0.5, mean)
        numpy.testing.assert_array_equal(out[i], ref)


def test_gray_image_in_nhwc_layout(tmp_path):
    """ImageData passes NHWC images as a transposed view; the result is the same."""
    rng = numpy.random.default_rng(2)
    nhwc = rng.integers(0, 256, size=(3, 6, 6, 1)).astype(numpy.uint8)
    t = DataTransformer(make_param(crop_size=4, mean_value=[100]), caffe_pb2.TEST)
    out = t(nhwc.transpose(0, 3, 1, 2), numpy.random.default_rng(0))
    for i in range(3):
        ref = naive_transform(numpy.ascontiguousarray(nhwc[i].transpose(2, 0, 1)), 4, 1, 1, False, 1.0,
                              mean_values=[100])
        numpy.testing.assert_array_equal(out[i], ref)


def test_train_crops_and_mirrors_are_uniform():
    """Every offset in [0, H-crop] x [0, W-crop] and both mirror states occur,
    at the rates a uniform choice gives (chi-square, fixed seed)."""
    t = DataTransformer(make_param(crop_size=3, mirror=True), caffe_pb2.TRAIN)
    rng = numpy.random.default_rng(1234)
    n = 60000
    h_off, w_off, mirror = t.draw(rng, n, 7, 6)
    cells = numpy.bincount(h_off * 4 + w_off, minlength=20)  # 5 x 4 offsets
    assert h_off.min() == 0 and h_off.max() == 4 and w_off.min() == 0 and w_off.max() == 3
    expected = n / 20.0
    chi2 = ((cells - expected) ** 2 / expected).sum()
    assert chi2 < 43.8  # 19 degrees of freedom, p = 0.001
    flips = mirror.sum()
    assert abs(flips - n / 2) < 3.29 * (n * 0.25) ** 0.5  # p = 0.001 two-sided

    # The drawn choices are what apply() uses: check a few items pixel by pixel.
    batch = numpy.arange(2 * 1 * 7 * 6, dtype=numpy.uint8).reshape(2, 1, 7, 6)
    out = t.apply(batch, h_off[:2], w_off[:2], mirror[:2])
    for i in range(2):
        ref = naive_transform(batch[i], 3, h_off[i], w_off[i], mirror[i], 1.0)
        numpy.testing.assert_array_equal(out[i], ref)


def test_test_phase_mirrors_too_but_crops_centre():
    t = DataTransformer(make_param(crop_size=2, mirror=True), caffe_pb2.TEST)
    h_off, w_off, mirror = t.draw(numpy.random.default_rng(0), 2000, 5, 6)
    assert (h_off == 1).all() and (w_off == 2).all()
    assert 800 < mirror.sum() < 1200


def test_errors(tmp_path):
    mean = numpy.zeros((3, 4, 4), numpy.float32)
    path = write_mean(tmp_path / "m.binaryproto", mean)
    with pytest.raises(ConfigError, match="mean_file and mean_value"):
        DataTransformer(make_param(mean_file=path, mean_value=[1.0]))
    with pytest.raises(ShapeError, match="crop_size 9 is larger"):
        DataTransformer(make_param(crop_size=9)).output_shape((3, 8, 8))
    with pytest.raises(ShapeError, match=r"mean file .* has shape \(3, 4, 4\)"):
        DataTransformer(make_param(mean_file=path)).output_shape((3, 5, 5))
    with pytest.raises(ShapeError, match="1 mean_value or as many as channels"):
        DataTransformer(make_param(mean_value=[1.0, 2.0])).output_shape((3, 5, 5))
    with pytest.raises(ConfigError, match="force_color and force_gray"):
        DataTransformer(make_param(force_color=True, force_gray=True))
    with pytest.raises(FileNotFoundError, match="nope.binaryproto"):
        DataTransformer(make_param(mean_file=str(tmp_path / "nope.binaryproto")))


@pytest.mark.parametrize("crop,phase", [(5, caffe_pb2.TEST), (0, caffe_pb2.TEST), (0, caffe_pb2.TRAIN),
                                        (8, caffe_pb2.TRAIN)])
@pytest.mark.parametrize("mean_kind", ["file", "values", "none"])
def test_mirror_in_every_layout_matches_reference(tmp_path, crop, phase, mean_kind):
    rng = numpy.random.default_rng(8)
    batch = rng.integers(0, 256, size=(12, 3, 8, 10)).astype(numpy.uint8)
    kw = dict(mirror=True, scale=0.25)
    mean = None
    if crop:
        kw["crop_size"] = crop
    if mean_kind == "file":
        mean = (rng.random((3, 8, 10)) * 255).astype(numpy.float32)
        kw["mean_file"] = write_mean(tmp_path / "m.binaryproto", mean)
    elif mean_kind == "values":
        kw["mean_value"] = [1.5, 2.5, 3.5]
    t = DataTransformer(make_param(**kw), phase)
    h_off, w_off, flags = t.draw(numpy.random.default_rng(2), 12, 8, 10)
    keep = batch.copy()
    out = t.apply(batch, h_off, w_off, flags)
    numpy.testing.assert_array_equal(batch, keep)  # the input is never modified
    for i in range(12):
        ref = naive_transform(batch[i], crop, h_off[i], w_off[i], flags[i], 0.25, mean, kw.get("mean_value"))
        numpy.testing.assert_array_equal(out[i], ref)
