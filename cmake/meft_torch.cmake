# LibTorch for the worker, from either of the two places meft builds against: Debian's CPU
# LibTorch 1.13 (libtorch-dev, headers in /usr/include) or a CUDA LibTorch 2.x such as the one
# inside PyPI's torch wheel (scripts/build-cuda.sh). Defines what TorchConfig.cmake defines
# (TORCH_LIBRARIES, TORCH_INCLUDE_DIRS, TORCH_CUDA_LIBRARIES when LibTorch has CUDA) after the
# repairs that a LibTorch outside /usr needs on a machine that also has Debian's:
#
# 1. TorchConfig looks for libtorch and libc10 with find_library(... PATHS <prefix>/lib), and PATHS
#    come after the system folders, so with libtorch-dev installed it links Debian's libc10.so
#    next to the wheel's libtorch. Both are replaced by the copies in LibTorch's own lib/.
# 2. The wheel's include/ also holds the protobuf 3.13 and fmt 12 headers it was built with.
#    Every -isystem folder precedes /usr/include, so our generated *.pb.h files and spdlog would
#    compile against those instead of Debian's protobuf 3.21 and fmt 9 that they link. The
#    worker's targets see LibTorch's headers through a folder of links that leaves out google/
#    and fmt/ (LibTorch's own headers that meft includes need neither).
# 3. Caffe2's cuda.cmake enables the CUDA language and then warns that CMake's default
#    CMAKE_CUDA_ARCHITECTURES is ignored (its nvcc flags come from TORCH_CUDA_ARCH_LIST). Policy
#    CMP0104 OLD keeps CMake from setting that default. meft compiles no .cu files: the CUDA
#    sources are host code calling the CUDA runtime, compiled by the C++ compiler.
# 4. PyPI's libtorch.so exports pieces of a newer libstdc++ that were linked into it statically
#    (std::filesystem::remove_all and others; pytorch/pytorch#133437). Listed before
#    libstdc++.so.6 among a program's needed libraries, it supplies those functions to the whole
#    program, and its remove_all jumps to address 0 on Debian 12 (every test that cleans up a
#    folder crashed). libstdc++ is therefore the first library every program needs.
# 5. Caffe2's mkl.cmake adds /lib/intel64 and two Windows folders to every link (MKL_ROOT is
#    empty without MKL); they end up in the build tree's RPATHs. Dropped when MKL is absent.

cmake_policy(PUSH)
cmake_policy(SET CMP0104 OLD)
find_package(Torch CONFIG REQUIRED)
cmake_policy(POP)

# 1. libtorch and libc10 from LibTorch's own folder.
set(_meft_var_torch TORCH_LIBRARY)
set(_meft_var_c10 c10_LIBRARY)
foreach(_meft_lib torch c10)
  set(_meft_var ${_meft_var_${_meft_lib}})
  set(_meft_own "${TORCH_INSTALL_PREFIX}/lib/lib${_meft_lib}.so")
  set(_meft_found "${${_meft_var}}")
  if(EXISTS "${_meft_own}" AND NOT _meft_found STREQUAL _meft_own)
    message(STATUS "LibTorch: ${_meft_found} is another LibTorch's; using ${_meft_own}")
    set(_meft_libs "")
    foreach(_meft_item IN LISTS TORCH_LIBRARIES)
      if(_meft_item STREQUAL _meft_found)
        set(_meft_item "${_meft_own}")
      endif()
      list(APPEND _meft_libs "${_meft_item}")
    endforeach()
    set(TORCH_LIBRARIES "${_meft_libs}")
    set(${_meft_var} "${_meft_own}" CACHE FILEPATH "LibTorch's lib${_meft_lib}" FORCE)
  endif()
endforeach()

# 2. LibTorch's headers without the third-party ones that shadow Debian's.
set(_meft_torch_include "${TORCH_INSTALL_PREFIX}/include")
if(NOT _meft_torch_include IN_LIST CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES
   AND (EXISTS "${_meft_torch_include}/google" OR EXISTS "${_meft_torch_include}/fmt"))
  set(_meft_links "${CMAKE_BINARY_DIR}/torch-include")
  file(REMOVE_RECURSE "${_meft_links}")
  file(MAKE_DIRECTORY "${_meft_links}")
  file(GLOB _meft_entries RELATIVE "${_meft_torch_include}" "${_meft_torch_include}/*")
  foreach(_meft_entry IN LISTS _meft_entries)
    if(NOT _meft_entry MATCHES "^(google|fmt)$")
      file(CREATE_LINK "${_meft_torch_include}/${_meft_entry}" "${_meft_links}/${_meft_entry}" SYMBOLIC)
    endif()
  endforeach()
  string(REPLACE "${_meft_torch_include}" "${_meft_links}" TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS}")
  # The imported targets carry the include folder too; every target that links them sees it.
  get_directory_property(_meft_imported IMPORTED_TARGETS)
  foreach(_meft_target IN LISTS _meft_imported)
    get_target_property(_meft_dirs ${_meft_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(_meft_dirs)
      string(REPLACE "${_meft_torch_include}" "${_meft_links}" _meft_dirs "${_meft_dirs}")
      set_target_properties(${_meft_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_meft_dirs}")
    endif()
  endforeach()
  message(STATUS "LibTorch: headers through ${_meft_links} (without its google/ and fmt/)")
endif()

# 4. libstdc++ before libtorch in every program's DT_NEEDED (link options precede the objects).
# Harmless with Debian's LibTorch, which exports no libstdc++ code.
add_link_options("LINKER:--push-state,--no-as-needed" -lstdc++ "LINKER:--pop-state")

# 5. No MKL folders without MKL.
if(TARGET caffe2::mkl AND NOT MKL_FOUND)
  set_property(TARGET caffe2::mkl PROPERTY INTERFACE_LINK_DIRECTORIES "")
endif()
