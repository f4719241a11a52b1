"""ssh settings, grouped (``Cluster(ssh=SshOptions(...))``) or as the old keyword arguments."""

from __future__ import annotations

import pytest

from qjam_nb import Cluster, SshOptions


def test_grouped_and_keyword_settings_are_the_same_settings():
    grouped = Cluster("local:1", echo=False, start_timeout=20,
                      ssh=SshOptions(user="ann", port=2222, identity="~/k", python="python3", accept_new_host=True))
    keywords = Cluster("local:1", echo=False, start_timeout=20,
                       user="ann", port=2222, identity="~/k", python="python3", accept_new_host=True)
    try:
        assert grouped.ssh_options == keywords.ssh_options
        assert grouped.ssh_options.user == "ann" and grouped.ssh_options.accept_new_host is True
        # connecting is bounded by start_timeout, either way
        assert grouped.ssh_options.timeout == keywords.ssh_options.timeout == 20
        assert grouped.map(lambda p, xs: sum(xs) + p, 1, [1, 2, 3], slice_size=3) == 7
    finally:
        grouped.shutdown()
        keywords.shutdown()


@pytest.mark.parametrize("keyword", [{"user": "bob"}, {"port": 22}, {"identity": "~/k"}, {"python": "python3"},
                                     {"accept_new_host": True}])
def test_both_at_once_is_refused_naming_the_keyword(keyword):
    with pytest.raises(TypeError) as info:
        Cluster("local:1", echo=False, ssh=SshOptions(user="ann"), **keyword)
    message = str(info.value)
    assert f"{next(iter(keyword))}=" in message and "ssh=SshOptions(" in message


def test_ssh_must_be_ssh_options():
    with pytest.raises(TypeError, match=r"ssh= takes an SshOptions"):
        Cluster("local:1", echo=False, ssh={"user": "ann"})
