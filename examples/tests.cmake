# Tests of the examples (included from examples/CMakeLists.txt when ZO2_BUILD_TESTS is on).
