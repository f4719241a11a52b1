"""Transports: start worker processes and hand back their byte streams.

``base`` holds the interface and the bootstrap line every transport runs,
``local`` starts workers as child processes of this one, and ``link`` turns
any worker's byte stream into frames in, frames out.
"""
