"""netlib.data.image: Caffe's OpenCV image path on Pillow + NumPy.

The first half needs only Pillow; the second half compares with cv2 (the
independent reference) and is skipped when cv2 is not importable.
"""
import io
import sys
import time

import numpy as np
import pytest

from conftest import shared_path
from netlib.data import image
from netlib.errors import ConfigError, NetlibError, NetlibFileNotFoundError

PIL = pytest.importorskip("PIL", reason="netlib.data.image decodes with Pillow")
from PIL import Image, ImageFile  # noqa: E402

PHOTOS = ("cat.jpg", "cat_gray.jpg", "fish-bike.jpg")


@pytest.fixture(autouse=True)
def pillow_backend():
    image.set_backend("pillow")
    yield
    image.set_backend("pillow")


@pytest.fixture
def cv2():
    return pytest.importorskip("cv2", reason="cv2 (opencv-python) is the bit-exactness reference")


def encode(pil, fmt, **kw):
    out = io.BytesIO()
    pil.save(out, fmt, **kw)
    return out.getvalue()


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


def rng_image(shape, seed=0, dtype=np.uint8):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def with_orientation(rgb, fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(Image.fromarray(rgb), fmt, exif=exif.tobytes(), **extra)


# Known pixels (RGB): red, green, blue and two that tell the grey weights apart.
PIXELS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                   [[0, 0, 7], [0, 49, 217], [10, 200, 30]]], np.uint8)


# ============================================================ Pillow only

def test_bgr_order_shapes_and_dtype(tmp_path):
    path = write(tmp_path, "px.png", encode(Image.fromarray(PIXELS), "PNG"))
    img = image.imread(path)
    assert img.shape == (2, 3, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    np.testing.assert_array_equal(img, PIXELS[:, :, ::-1])
    assert img[0, 0].tolist() == [0, 0, 255]  # red is the last channel
    gray = image.imread(path, color=False)
    assert gray.shape == (2, 3, 1) and gray.flags.c_contiguous
    native = image.imdecode(read_bytes(path), "native")
    np.testing.assert_array_equal(native, img)


def test_gray_weights_follow_the_decoder():
    # libpng truncates; BMP/TIFF/PPM round with 14-bit weights; WebP uses cvtColor's.
    expected = {"PNG": [76, 149, 29, 0, 53, 123], "BMP": [76, 150, 29, 1, 54, 124],
                "TIFF": [76, 150, 29, 1, 54, 124], "PPM": [76, 150, 29, 1, 54, 124],
                "WEBP": [76, 150, 29, 1, 53, 124]}
    for fmt, values in expected.items():
        extra = {"lossless": True} if fmt == "WEBP" else {}
        gray = image.imdecode(encode(Image.fromarray(PIXELS), fmt, **extra), "gray", what=fmt)
        assert gray[:, :, 0].ravel().tolist() == values, fmt


def test_gray_sources_palette_and_alpha():
    rgba = rng_image((5, 7, 4))
    lum = rgba[:, :, 0]
    data = encode(Image.fromarray(lum), "PNG")
    assert image.imdecode(data, "native").shape == (5, 7, 1)
    np.testing.assert_array_equal(image.imdecode(data, "color"), np.repeat(lum[:, :, None], 3, 2))
    la = encode(Image.fromarray(rgba[:, :, :2], "LA"), "PNG")
    np.testing.assert_array_equal(image.imdecode(la, "gray")[:, :, 0], lum)
    np.testing.assert_array_equal(image.imdecode(la, "native"), rgba[:, :, [0, 0, 0, 1]])
    data = encode(Image.fromarray(rgba), "PNG")
    np.testing.assert_array_equal(image.imdecode(data, "color"), rgba[:, :, 2::-1])
    np.testing.assert_array_equal(image.imdecode(data, "native"), rgba[:, :, [2, 1, 0, 3]])
    pal = Image.fromarray(rgba[:, :, :3]).quantize(8)
    np.testing.assert_array_equal(image.imdecode(encode(pal, "PNG"), "color"),
                                  np.asarray(pal.convert("RGB"))[:, :, ::-1])


def test_sixteen_bit_images(tmp_path):
    deep = rng_image((4, 6), dtype=np.uint16)
    path = write(tmp_path, "deep.png", encode(Image.fromarray(deep), "PNG"))
    high = (deep >> 8).astype(np.uint8)
    np.testing.assert_array_equal(image.imread(path)[:, :, 1], high)
    np.testing.assert_array_equal(image.imread(path, color=False)[:, :, 0], high)
    with pytest.raises(image.ImageError, match="only 8-bit"):
        image.imdecode(read_bytes(path), "native", what="record 00000007")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jpg")
    with pytest.raises(NetlibFileNotFoundError, match="nope.jpg") as err:
        image.imread(path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, NetlibError)


def test_non_image_and_directory(tmp_path):
    path = write(tmp_path, "notes.jpg", b"this is not an image\n" * 10)
    with pytest.raises(image.ImageError, match="notes.jpg") as err:
        image.imread(path)
    assert isinstance(err.value, ValueError) and isinstance(err.value, NetlibError)
    with pytest.raises(image.ImageError, match=str(tmp_path.name)):
        image.imread(str(tmp_path))


@pytest.mark.parametrize("fmt,cut", [("JPEG", 0.5), ("JPEG", -2), ("PNG", 0.5), ("PNG", -12)])
def test_truncated_files_are_errors(tmp_path, fmt, cut):
    data = encode(Image.fromarray(rng_image((64, 64, 3))), fmt)
    data = data[:int(len(data) * cut)] if cut > 0 else data[:cut]  # -12: PNG without IEND
    path = write(tmp_path, "cut." + fmt.lower(), data)
    for color in (True, False):
        with pytest.raises(image.ImageError, match="cut"):
            image.imread(path, color)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_imdecode_errors_name_the_record():
    with pytest.raises(image.ImageError, match="record 00000042"):
        image.imdecode(b"\x00garbage" * 20, "color", what="record 00000042")
    with pytest.raises(image.ImageError, match="<buffer>: empty"):
        image.imdecode(b"")
    with pytest.raises(ConfigError, match="mode"):
        image.imdecode(b"xx", "rgb")


def test_imdecode_accepts_bytes_like():
    data = encode(Image.fromarray(PIXELS), "PNG")
    for buf in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        np.testing.assert_array_equal(image.imdecode(buf), PIXELS[:, :, ::-1])


def test_exif_orientation_applied_except_native():
    rgb = rng_image((6, 10, 3))
    plain = image.imdecode(encode(Image.fromarray(rgb), "PNG"))
    rotated = image.imdecode(with_orientation(rgb, "PNG", 6))  # 6: turn 90 degrees clockwise
    np.testing.assert_array_equal(rotated, np.rot90(plain, -1))
    assert image.imdecode(with_orientation(rgb, "PNG", 6), "gray").shape == (10, 6, 1)
    np.testing.assert_array_equal(image.imdecode(with_orientation(rgb, "PNG", 6), "native"), plain)
    assert image.imdecode(with_orientation(rgb, "JPEG", 8)).shape == (10, 6, 3)


def test_resize_known_values():
    row = np.array([[[0], [255]]], np.uint8)                  # 1x2 -> 1x4
    assert image.resize(row, 1, 4)[0, :, 0].tolist() == [0, 64, 191, 255]
    block = np.array([[0, 1], [1, 1]], np.uint8)              # exact 2x down: INTER_AREA
    assert image.resize(block, 1, 1).tolist() == [[1]]
    img = rng_image((9, 11, 3))
    same = image.resize(img, 9, 11)
    np.testing.assert_array_equal(same, img)
    assert same is not img
    flat = np.full((13, 17, 3), 77, np.uint8)
    for h, w in [(1, 1), (5, 30), (40, 3), (26, 34)]:
        out = image.resize(flat, h, w)
        assert out.shape == (h, w, 3) and out.flags.c_contiguous and (out == 77).all()
    assert image.resize(img[:, :, 0], 4, 5).shape == (4, 5)


def test_resize_rejects_bad_input():
    with pytest.raises(image.ImageError, match="uint8"):
        image.resize(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(image.ImageError, match="positive"):
        image.resize(np.zeros((4, 4, 3), np.uint8), 0, 2)


def test_resize_speed():
    img = rng_image((375, 500, 3))
    best = min(_timed(image.resize, img, 256, 256) for _ in range(5))
    assert best < 0.015, "resize 500x375 -> 256x256 took %.1f ms" % (best * 1e3)


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def test_layout_helpers():
    img = rng_image((4, 5, 3))
    chw = image.hwc_to_chw(img)
    assert chw.shape == (3, 4, 5) and chw.flags.c_contiguous
    np.testing.assert_array_equal(chw[2], img[:, :, 2])
    back = image.chw_to_hwc(chw)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, img)
    assert image.hwc_to_chw(img[:, :, 0]).shape == (1, 4, 5)


def test_imencode_roundtrip():
    img = rng_image((12, 9, 4))
    for c in (1, 3, 4):
        part = np.ascontiguousarray(img[:, :, :c])
        data = image.imencode(part, "png")
        assert data.startswith(b"\x89PNG")
        np.testing.assert_array_equal(image.imdecode(data, "native"), part)
    ramp = np.linspace(0, 255, 24).astype(np.uint8)
    smooth = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128), axis=2).astype(np.uint8)
    data = image.imencode(smooth, ".JPG")
    assert data.startswith(b"\xff\xd8")
    assert np.abs(image.imdecode(data).astype(int) - smooth).mean() < 3
    assert image.imdecode(image.imencode(smooth[:, :, :1], "jpeg"), "native").shape == (24, 24, 1)
    with pytest.raises(image.ImageError, match="bmp"):
        image.imencode(smooth, "bmp")
    with pytest.raises(image.ImageError):
        image.imencode(img, "jpg")  # 4 channels


def test_backend_selection(monkeypatch):
    assert image.get_backend() == "pillow"
    with pytest.raises(ConfigError, match="backend"):
        image.set_backend("magick")
    monkeypatch.setitem(sys.modules, "cv2", None)  # cv2 "not installed"
    with pytest.raises(ConfigError, match="cv2"):
        image.set_backend("opencv")
    assert image.get_backend() == "pillow"


def test_shared_photos():
    shapes = {"cat.jpg": (360, 480, 3), "cat_gray.jpg": (360, 480, 3), "fish-bike.jpg": (323, 481, 3)}
    for name, shape in shapes.items():
        path = shared_path("data", "images", name)
        assert image.imread(path).shape == shape
        assert image.imread(path, False).shape == shape[:2] + (1,)
    gray = image.imdecode(read_bytes(shared_path("data", "images", "cat_gray.jpg")), "native")
    assert gray.shape == (360, 480, 1)


# ============================================================ cv2 as the reference

def _cv_hwc(img):
    return img if img.ndim == 3 else img[:, :, None]


def test_resize_matches_cv2_grid(cv2):
    rng = np.random.default_rng(1)
    cases = 0
    for H, W in [(1, 1), (2, 3), (5, 4), (16, 17), (33, 64), (100, 101)]:
        src = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        for h in (1, 2, 3, 8, 17, 50, 99, 200):
            for w in (1, 2, 8, 15, 32, 33, 128):
                for c in (1, 3):
                    img = np.ascontiguousarray(src[:, :, :c])
                    ref = _cv_hwc(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
                    out = image.resize(img, h, w)
                    assert out.shape == ref.shape
                    assert (out == ref).all(), (H, W, c, h, w)
                    cases += 1
    assert cases == 672


@pytest.mark.parametrize("name", PHOTOS)
def test_resize_photos_match_cv2(cv2, name):
    bgr = cv2.imread(shared_path("data", "images", name))
    gray = cv2.imread(shared_path("data", "images", name), cv2.IMREAD_GRAYSCALE)[:, :, None]
    H, W = bgr.shape[:2]
    for img in (bgr, gray):
        for h, w in [(256, 256), (227, 227), (37, 100), (H // 2, W // 2), (2 * H, 2 * W),
                     (1, 1), (H, 1), (701, 13)]:
            ref = _cv_hwc(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
            np.testing.assert_array_equal(image.resize(img, h, w), ref, err_msg="%s %dx%d" % (name, h, w))
    even = np.ascontiguousarray(bgr[:H // 2 * 2, :W // 2 * 2])  # exact 2x: OpenCV's INTER_AREA
    np.testing.assert_array_equal(image.resize(even, H // 2, W // 2),
                                  cv2.resize(even, (W // 2, H // 2), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("name", PHOTOS)
def test_photos_decode_like_cv2(cv2, name):
    path = shared_path("data", "images", name)
    np.testing.assert_array_equal(image.imread(path), cv2.imread(path, cv2.IMREAD_COLOR))
    np.testing.assert_array_equal(image.imread(path, False)[:, :, 0],
                                  cv2.imread(path, cv2.IMREAD_GRAYSCALE))
    data = read_bytes(path)
    np.testing.assert_array_equal(image.imdecode(data, "native"),
                                  _cv_hwc(cv2.imdecode(np.frombuffer(data, np.uint8), -1)))


def _format_cases(cv2):
    rgb, rgba = rng_image((24, 31, 3), 2), rng_image((24, 31, 4), 3)
    lum = rgb[:, :, 0].copy()
    pal = Image.fromarray(rgb).quantize(40)
    return {
        "png rgb": encode(Image.fromarray(rgb), "PNG"),
        "png rgba": encode(Image.fromarray(rgba), "PNG"),
        "png gray": encode(Image.fromarray(lum), "PNG"),
        "png gray+alpha": encode(Image.fromarray(rgba[:, :, :2], "LA"), "PNG"),
        "png palette": encode(pal, "PNG"),
        "png palette+trns": encode(pal, "PNG", transparency=3),
        "png rgb+trns": encode(Image.fromarray(rgb), "PNG", transparency=tuple(map(int, rgb[0, 0]))),
        "png gray+trns": encode(Image.fromarray(lum), "PNG", transparency=int(lum[0, 0])),
        "png 1-bit": encode(Image.fromarray(lum > 100), "PNG"),
        "png 2-bit": encode(Image.fromarray(lum // 85 * 85), "PNG", bits=2),
        "png 16-bit gray": encode(Image.fromarray(rng_image((24, 31), 4, np.uint16)), "PNG"),
        "png 16-bit rgb": cv2.imencode(".png", rng_image((24, 31, 3), 5, np.uint16))[1].tobytes(),
        "bmp rgb": encode(Image.fromarray(rgb), "BMP"),
        "bmp palette": encode(Image.fromarray(rgb).quantize(16), "BMP"),
        "bmp 1-bit": encode(Image.fromarray(lum > 100), "BMP"),
        "tiff rgb": encode(Image.fromarray(rgb), "TIFF", compression="tiff_lzw"),
        "tiff rgba": encode(Image.fromarray(rgba), "TIFF"),
        "tiff gray+alpha": encode(Image.fromarray(rgba[:, :, :2], "LA"), "TIFF"),
        "tiff 16-bit gray": encode(Image.fromarray(rng_image((24, 31), 6, np.uint16)), "TIFF"),
        "webp lossless rgba": encode(Image.fromarray(rgba), "WEBP", lossless=True),
        "webp lossy": encode(Image.fromarray(rgb), "WEBP", quality=80),
        "gif": encode(Image.fromarray(rgb).quantize(64), "GIF"),
        "ppm": encode(Image.fromarray(rgb), "PPM"),
        "pgm": encode(Image.fromarray(lum), "PPM"),
        "jpeg 4:4:4": encode(Image.fromarray(rgb), "JPEG", quality=90, subsampling=0),
        "jpeg 4:2:2 progressive": encode(Image.fromarray(rgb), "JPEG", subsampling=1, progressive=True),
        "jpeg gray": encode(Image.fromarray(lum), "JPEG"),
        "jpeg cmyk": encode(Image.fromarray(rgba, "CMYK"), "JPEG"),
    }


def test_formats_decode_like_cv2(cv2):
    flags = {"color": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE, "native": cv2.IMREAD_UNCHANGED}
    for name, data in _format_cases(cv2).items():
        for mode, flag in flags.items():
            ref = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            if ref.dtype != np.uint8:  # 16-bit native: Caffe refuses it, so do we
                assert mode == "native" and "16-bit" in name
                with pytest.raises(image.ImageError, match="8-bit"):
                    image.imdecode(data, mode, what=name)
                continue
            ours = image.imdecode(data, mode, what=name)
            ref = _cv_hwc(ref)
            assert ours.shape == ref.shape, (name, mode)
            diff = np.abs(ours.astype(int) - ref)
            if name == "png 16-bit rgb" and mode == "gray":  # documented: <= 1 on < 25%
                assert diff.max() <= 1 and (diff > 0).mean() < 0.25
            else:
                assert diff.max() == 0, (name, mode, diff.max())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_like_cv2(cv2, tmp_path, fmt):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:10, :10] = 255
    rgb[20:, 30:, 0] = 200
    rgb[5:25, 15:20, 1] = 120
    for orientation in range(1, 9):
        data = with_orientation(rgb, fmt, orientation)
        path = write(tmp_path, "o%d.%s" % (orientation, fmt.lower()), data)
        buf = np.frombuffer(data, np.uint8)
        np.testing.assert_array_equal(image.imread(path), cv2.imread(path))
        np.testing.assert_array_equal(image.imread(path, False)[:, :, 0], cv2.imread(path, 0))
        np.testing.assert_array_equal(image.imdecode(data), cv2.imdecode(buf, 1))
        np.testing.assert_array_equal(image.imdecode(data, "native"), cv2.imdecode(buf, -1))


def test_imencode_like_cv2(cv2):
    photo = cv2.imread(shared_path("data", "images", "fish-bike.jpg"))
    for img in (photo, rng_image((37, 53, 3)), np.ascontiguousarray(photo[:, :, :1])):
        assert image.imencode(img, "jpg") == cv2.imencode(".jpg", img)[1].tobytes()
        decoded = cv2.imdecode(np.frombuffer(image.imencode(img, "png"), np.uint8), -1)
        np.testing.assert_array_equal(_cv_hwc(decoded), img)


def test_opencv_backend(cv2, tmp_path):
    path = shared_path("data", "images", "cat.jpg")
    pillow = image.imread(path), image.imread(path, False)
    deep = encode(Image.fromarray(rng_image((4, 6), dtype=np.uint16)), "PNG")
    cut = write(tmp_path, "cut.jpg", read_bytes(path)[:5000])
    text = write(tmp_path, "text.png", b"not an image")
    image.set_backend("opencv")
    assert image.get_backend() == "opencv"
    np.testing.assert_array_equal(image.imread(path), pillow[0])
    np.testing.assert_array_equal(image.imread(path, False), pillow[1])
    np.testing.assert_array_equal(image.resize(pillow[0], 227, 227),
                                  cv2.resize(pillow[0], (227, 227)))
    assert image.resize(pillow[1], 10, 20).shape == (10, 20, 1)
    assert image.imencode(pillow[0], "jpg") == cv2.imencode(".jpg", pillow[0])[1].tobytes()
    with pytest.raises(NetlibFileNotFoundError, match="missing.jpg"):
        image.imread(str(tmp_path / "missing.jpg"))
    for bad in (cut, text):
        with pytest.raises(image.ImageError, match=bad.rsplit("/", 1)[-1]):
            image.imread(bad)
    with pytest.raises(image.ImageError, match="record 1"):
        image.imdecode(b"junk", what="record 1")
    with pytest.raises(image.ImageError, match="8-bit"):
        image.imdecode(deep, "native")
    assert image.imdecode(deep, "gray").shape == (4, 6, 1)
