"""The notebook face of qjam_nb: magics and widgets. The only layer that imports IPython."""
