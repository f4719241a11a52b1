"""Transports: start worker processes and hand back their byte streams.

``registry`` is the door from above: ``open_host(entry, options)`` picks the
transport that serves a host entry and opens it (a new transport registers
there). ``base`` holds the interface and the bootstrap line every transport
runs, ``local``/``forked`` start workers on this machine, ``ssh`` on others,
and ``link`` turns any worker's byte stream into frames in, frames out, and
is the only handle above this layer has on a worker's process.
"""
