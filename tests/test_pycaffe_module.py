"""``import netlib as caffe`` has pycaffe's whole module surface (caffe-surface.md
section 7: python/caffe/__init__.py's exports) and its helpers behave as pycaffe's."""
import importlib
import logging
import re
import time

import pytest

import netlib as caffe

# python/caffe/__init__.py of BVLC Caffe 1.0, name by name.
PYCAFFE_EXPORTS = """
Net SGDSolver NesterovSolver AdaGradSolver RMSPropSolver AdaDeltaSolver AdamSolver NCCL Timer
init_log log set_mode_cpu set_mode_gpu set_device Layer get_solver layer_type_list set_random_seed
solver_count set_solver_count solver_rank set_solver_rank set_multiprocess has_nccl __version__
TRAIN TEST Classifier Detector io layers params NetSpec to_proto proto
""".split()


def test_every_pycaffe_export_is_there():
    missing = [name for name in PYCAFFE_EXPORTS if not hasattr(caffe, name)]
    assert not missing
    assert (caffe.TRAIN, caffe.TEST) == (0, 1)
    assert caffe.proto.caffe_pb2.NetParameter is caffe.caffe_pb2.NetParameter
    assert re.match(r"^\d+\.\d+\.\d+", caffe.__version__)
    for name in ("SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"):
        assert issubclass(getattr(caffe, name), caffe.Solver)
    assert "Python" in caffe.layer_type_list() and "Convolution" in caffe.layer_type_list()


@pytest.mark.parametrize("name", ["draw", "net_spec", "coord_map", "classifier", "detector", "io", "proto",
                                  "proto.caffe_pb2"])
def test_submodules_import_by_their_pycaffe_names(name):
    module = importlib.import_module("netlib." + name)
    assert module.__name__ == "netlib." + name
    assert getattr(caffe, name.split(".")[0]) is importlib.import_module("netlib." + name.split(".")[0])


def test_classifier_detector_netspec_are_the_classes_of_their_modules():
    assert caffe.Classifier is caffe.classifier.Classifier and issubclass(caffe.Classifier, caffe.Net)
    assert caffe.Detector is caffe.detector.Detector and issubclass(caffe.Detector, caffe.Net)
    assert caffe.NetSpec is caffe.net_spec.NetSpec and caffe.to_proto is caffe.net_spec.to_proto
    assert caffe.layers is caffe.net_spec.layers and caffe.params is caffe.net_spec.params
    assert caffe.io.Transformer and caffe.io.load_image


def test_init_log_and_log_write_glog_lines(capfd):
    logger = logging.getLogger("netlib")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        caffe.init_log()
        caffe.log("hello from the script")
        err = capfd.readouterr().err
        assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] hello from the script$", err, re.M), err
        caffe.init_log(1)                        # WARNING and above
        caffe.log("not shown")
        logger.warning("shown")
        err = capfd.readouterr().err
        assert "not shown" not in err and re.search(r"^W\d{4} .*\] shown$", err, re.M)
        caffe.init_log(0, False)
        caffe.log("quiet")
        assert "quiet" not in capfd.readouterr().err
        with pytest.raises(caffe.ConfigError):
            caffe.init_log(7)
    finally:
        caffe.init_log(0, False)
        logger.level, logger.propagate, logger.handlers = saved[0], saved[1], saved[2]


def test_timer_measures_milliseconds():
    timer = caffe.Timer()
    timer.start()
    time.sleep(0.05)
    timer.stop()
    assert 45 <= timer.ms < 1000
    assert timer.ms == timer.ms                  # stopped: it no longer moves
    assert timer.seconds == pytest.approx(timer.ms / 1000)


def test_solver_count_rank_multiprocess_and_nccl_are_truthful():
    assert caffe.solver_count() == 1 and caffe.solver_rank() == 0
    try:
        caffe.set_solver_count(4)
        caffe.set_solver_rank(2)
        caffe.set_multiprocess(True)
        assert (caffe.solver_count(), caffe.solver_rank()) == (4, 2)
        with pytest.raises(caffe.ConfigError):
            caffe.set_solver_count(0)
    finally:
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)
        caffe.set_multiprocess(False)
    from netlib import nccl
    assert caffe.has_nccl() is (nccl.nccl_module() is not None)   # CuPy built with NCCL (tests/test_nccl.py)
    with pytest.raises(caffe.ConfigError, match="NCCL"):
        caffe.NCCL(None, None)                  # no solver count set: a clear error, not a lone replica
    if not caffe.has_nccl():
        with pytest.raises(caffe.ConfigError, match="NCCL"):
            caffe.NCCL.new_uid()
