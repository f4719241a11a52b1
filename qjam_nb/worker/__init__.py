"""The travelling worker package: the only code that runs on worker machines.

It imports the standard library and cloudpickle only. The master loads it by
file location under the name ``qjam_worker``; it never imports qjam_nb.
"""
