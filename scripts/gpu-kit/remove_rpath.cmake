# cmake -DFILE=<elf> -P remove_rpath.cmake: removes the RPATH/RUNPATH of one ELF file (the build
# tree's, which points into the build machine's venv), without needing patchelf or chrpath.
file(RPATH_REMOVE FILE "${FILE}")
