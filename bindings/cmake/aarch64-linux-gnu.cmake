# Cross build for 64-bit ARM Linux (Raspberry Pi OS 64-bit, Android-like userlands, Graviton) with Debian's
# gcc-aarch64-linux-gnu. Select it with -DMVE_CROSS_AARCH64=ON at the top level, or pass this file as
# CMAKE_TOOLCHAIN_FILE. Run the results with: qemu-aarch64 -L /usr/aarch64-linux-gnu ./program
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(MVE_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "cross compiler prefix")
set(CMAKE_C_COMPILER ${MVE_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${MVE_CROSS_PREFIX}g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;/usr/aarch64-linux-gnu)
