"""Imported first by the data stage's forkserver workers (`run_ops` names it for preloading): they start from a
fresh interpreter, without the refusals of installs and downloads that `setup_ops` put into the stage's own
process, and Data-Juicer would install a package or fetch a file there when an op first needs one."""

from stages.recipe_ops import forbid_downloads, forbid_installs

forbid_installs()
forbid_downloads()
