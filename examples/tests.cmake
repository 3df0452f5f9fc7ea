# Tests of the examples (included from examples/CMakeLists.txt when ZO2_BUILD_TESTS is on):
# the zo2-opt program driven by tests/cli_tests.sh, one CTest test per case, each in its own
# scratch directory; and the user_stack example, whose exit status says whether its loss fell.
find_program(ZO2_BASH bash)
if(ZO2_BASH)
  foreach(case demo help checkpoint_resume export_reload data_formats errors)
    add_test(NAME zo2_opt_${case}
             COMMAND ${ZO2_BASH} ${CMAKE_CURRENT_SOURCE_DIR}/tests/cli_tests.sh ${case} $<TARGET_FILE:zo2-opt>
                     ${CMAKE_CURRENT_BINARY_DIR}/test_work/${case} ${PROJECT_SOURCE_DIR})
    set_tests_properties(zo2_opt_${case} PROPERTIES TIMEOUT 300 LABELS examples)
  endforeach()
endif()
add_test(NAME zo2_user_stack COMMAND zo2-user-stack)
set_tests_properties(zo2_user_stack PROPERTIES TIMEOUT 120 LABELS examples)
