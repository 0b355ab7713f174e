"""The command line's stages (`python -m stages.run ...`)."""
