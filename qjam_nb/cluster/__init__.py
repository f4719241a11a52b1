"""The cluster layer: pure logic over links. No sockets of its own, no IPython."""
