"""The version handshake: a worker whose cloudpickle cannot read ours is refused, naming both sides."""

from __future__ import annotations

import sys

import cloudpickle
import pytest
from conftest import OTHER_CLOUDPICKLE

from qjam_nb import Cluster, VersionMismatchError
from qjam_nb.executors.handshake import mismatch


def test_a_remote_cloudpickle_of_another_major_version_is_refused(ssh_world, python_with_other_cloudpickle):
    with pytest.raises(VersionMismatchError) as info:
        Cluster(["sshhost"], python=str(python_with_other_cloudpickle), echo=False)
    message = str(info.value)
    assert f"cloudpickle {OTHER_CLOUDPICKLE} there, {cloudpickle.__version__} here" in message
    assert "sshhost/0" in message and "--python" in message


def test_the_same_cluster_options_work_with_a_matching_python(ssh_world):
    with Cluster(["sshhost"], python=sys.executable, echo=False) as cluster:
        assert cluster.map(lambda p, xs: 7) == 7


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        ({"python": "3.11.2", "cloudpickle": "3.0.0", "numpy": "2.0.1"}, None),
        ({"python": "3.10.9", "cloudpickle": "3.0.0", "numpy": None}, "Python 3.10.9 there, 3.11.7 here"),
        ({"python": "3.11.7", "cloudpickle": "2.2.1", "numpy": None}, "cloudpickle 2.2.1 there, 3.1.3 here"),
        ({"python": "3.11.7", "cloudpickle": "3.1.3", "numpy": "1.26.4"}, "numpy 1.26.4 there, 2.4.6 here"),
        ({"python": "3.11.7", "cloudpickle": "3.1.3", "numpy": None}, None),  # no numpy: fine until an array comes
    ],
)
def test_mismatch_rules(hello, expected):
    master = {"python": "3.11.7", "cloudpickle": "3.1.3", "numpy": "2.4.6"}
    found = mismatch("node/0", hello, master)
    if expected is None:
        assert found is None
    else:
        assert expected in found and "node/0" in found
