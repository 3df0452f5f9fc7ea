# Data-parallel transports (included by the top-level CMakeLists after zo2 and zo2::cuda; both
# link zo2::zo2, or zo2::core where ZO2_WITH_MODELS is OFF):
#   zo2::mpi   MPI (find_package(MPI), e.g. Debian's libopenmpi-dev): include <zo2/comm/mpi.hpp>;
#              defines ZO2_HAVE_MPI.
#   zo2::nccl  NCCL (cmake/FindNCCL.cmake: the CUDA toolkit's, a system one, or the nvidia-nccl
#              wheel's) with the CUDA runtime, when CUDA is enabled: include <zo2/comm/nccl.hpp>;
#              defines ZO2_HAVE_NCCL, and links zo2::mpi too where MPI is found (the unique id is
#              bootstrapped through MPI_Bcast).
# Both are optional: without them the build is as before (nothing includes the headers), and
# ZO2_ENABLE_MPI / ZO2_ENABLE_NCCL switch them off explicitly.
option(ZO2_ENABLE_MPI "Build the MPI communicator, data-parallel zo2-opt and their tests where MPI is found" ON)
option(ZO2_ENABLE_NCCL "Build the NCCL communicator where NCCL and CUDA are found" ON)

if(ZO2_ENABLE_MPI)
  find_package(MPI COMPONENTS CXX QUIET)
  if(MPI_CXX_FOUND)
    add_library(zo2_mpi INTERFACE)
    add_library(zo2::mpi ALIAS zo2_mpi)
    target_link_libraries(zo2_mpi INTERFACE ${_zo2_all} MPI::MPI_CXX)
    target_compile_definitions(zo2_mpi INTERFACE ZO2_HAVE_MPI=1)
    # Open MPI's C++ bindings are deprecated and unused: keep them out of every compile.
    target_compile_definitions(zo2_mpi INTERFACE OMPI_SKIP_MPICXX=1 MPICH_SKIP_MPICXX=1)
    message(STATUS "zo2: MPI ${MPI_CXX_VERSION} found (zo2::mpi; launcher ${MPIEXEC_EXECUTABLE})")
  else()
    message(STATUS "zo2: MPI not found: no MPI communicator, zo2-opt trains in one process "
                   "(Debian: apt-get install libopenmpi-dev openmpi-bin)")
  endif()
endif()

if(ZO2_ENABLE_NCCL AND ZO2_ENABLE_CUDA)
  find_package(NCCL QUIET)
  if(NCCL_FOUND)
    add_library(zo2_nccl INTERFACE)
    add_library(zo2::nccl ALIAS zo2_nccl)
    target_link_libraries(zo2_nccl INTERFACE ${_zo2_all} CUDA::cudart NCCL::NCCL)
    target_compile_definitions(zo2_nccl INTERFACE ZO2_HAVE_NCCL=1)
    if(TARGET zo2::mpi)
      target_link_libraries(zo2_nccl INTERFACE zo2::mpi)
    endif()
    message(STATUS "zo2: NCCL ${NCCL_VERSION} found (zo2::nccl; ${NCCL_LIBRARY})")
  else()
    message(STATUS "zo2: NCCL not found: no NCCL communicator (set NCCL_ROOT, or pip install nvidia-nccl-cu12)")
  endif()
endif()

# The launcher's flags for tests and benchmarks: Open MPI refuses root without
# --allow-run-as-root, and more ranks than cores without --oversubscribe (CI: 2 cores, as root).
set(ZO2_MPIEXEC_FLAGS "" CACHE STRING "Extra flags for mpiexec in zo2's tests (default: Open MPI's root/oversubscribe flags)")
if(TARGET zo2::mpi AND MPIEXEC_EXECUTABLE AND NOT ZO2_MPIEXEC_FLAGS)
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _zo2_mpiexec_version ERROR_QUIET)
  if(_zo2_mpiexec_version MATCHES "Open MPI|OpenRTE")
    set(ZO2_MPIEXEC_FLAGS --allow-run-as-root --oversubscribe --bind-to none)
  endif()
endif()

# The latency of a step's reduction (bench/comm_latency.cpp, JSON lines; mpiexec -n N), built with
# the tests (a CTest smoke run keeps it working) or the benchmarks.
if(TARGET zo2::mpi AND ZO2_IS_TOP_LEVEL AND (ZO2_BUILD_TESTS OR ZO2_BUILD_BENCH))
  add_executable(zo2_comm_latency ${CMAKE_CURRENT_SOURCE_DIR}/bench/comm_latency.cpp)
  target_link_libraries(zo2_comm_latency PRIVATE zo2::mpi $<$<TARGET_EXISTS:zo2::nccl>:zo2::nccl>)
  target_compile_options(zo2_comm_latency PRIVATE $<$<NOT:$<CONFIG:Debug>>:-O2>)
endif()
