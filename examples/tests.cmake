# Tests of the examples (included from examples/CMakeLists.txt when ZO2_BUILD_TESTS is on):
# the zo2 program (zo2-opt) driven by tests/cli_tests.sh, one CTest test per case, each in its own
# scratch directory (llama_*: the LLaMA family on tests/fixtures/llama and tokenizer_json); and the
# user_stack example, whose exit status says whether its loss fell.
find_program(ZO2_BASH bash)
if(ZO2_BASH)
  foreach(case demo help checkpoint_resume export_reload data_formats optimizers errors gpu program_name
               llama_train llama_resume llama_export llama_tokenize llama_preset llama_errors llama_gpu)
    add_test(NAME zo2_opt_${case}
             COMMAND ${ZO2_BASH} ${CMAKE_CURRENT_SOURCE_DIR}/tests/cli_tests.sh ${case} $<TARGET_FILE:zo2-opt>
                     ${CMAKE_CURRENT_BINARY_DIR}/test_work/${case} ${PROJECT_SOURCE_DIR})
    set_tests_properties(zo2_opt_${case} PROPERTIES TIMEOUT 300 LABELS examples)
  endforeach()
  set_tests_properties(zo2_opt_gpu zo2_opt_llama_gpu PROPERTIES SKIP_REGULAR_EXPRESSION "SKIPPED: no CUDA device")
  set_tests_properties(zo2_opt_llama_tokenize PROPERTIES SKIP_REGULAR_EXPRESSION "SKIPPED: this build has no tokenizer.json reader")
endif()
add_test(NAME zo2_user_stack COMMAND zo2-user-stack)
set_tests_properties(zo2_user_stack PROPERTIES TIMEOUT 120 LABELS examples)

# Parity with Hugging Face transformers, where a Python that has it is named:
#   cmake -DZO2_HF_PYTHON=/path/to/python ...   (CI has no transformers and skips these)
# zo2_opt_hf_export: a demo run exported by zo2-opt loads in transformers with the same logits
# and token ids; tokenizer_hf: our tokenizer fixture's ids equal transformers' GPT2Tokenizer's.
set(ZO2_HF_PYTHON "" CACHE FILEPATH "A Python with torch + transformers, for the HF parity tests")
if(ZO2_HF_PYTHON AND ZO2_BASH)
  set(_hf_dir ${CMAKE_CURRENT_BINARY_DIR}/test_work/hf_export)
  add_test(NAME zo2_opt_hf_export
           COMMAND ${ZO2_BASH} -c "rm -rf '${_hf_dir}' && mkdir -p '${_hf_dir}' && \
'$<TARGET_FILE:zo2-opt>' train --demo --steps 30 --device cpu --export '${_hf_dir}/export' > '${_hf_dir}/train.log' && \
'${ZO2_HF_PYTHON}' '${PROJECT_SOURCE_DIR}/tests/fixtures/opt/check_export_hf.py' '${_hf_dir}/export' \
--zo2-opt '$<TARGET_FILE:zo2-opt>' --prompt 'Zeroth-order fine-tuning, naïve café 🙂'")
  add_test(NAME tokenizer_hf
           COMMAND ${ZO2_HF_PYTHON} ${PROJECT_SOURCE_DIR}/tests/fixtures/tokenizer/check_with_transformers.py
                   ${PROJECT_SOURCE_DIR}/tests/fixtures/tokenizer)
  # zo2_opt_llama_hf: every LLaMA-family fixture trained a few steps and exported (and a preset
  # with a tokenizer.json) against transformers (tests/fixtures/llama/check_export_hf.py).
  add_test(NAME zo2_opt_llama_hf
           COMMAND ${ZO2_BASH} ${CMAKE_CURRENT_SOURCE_DIR}/tests/cli_tests.sh llama_hf $<TARGET_FILE:zo2-opt>
                   ${CMAKE_CURRENT_BINARY_DIR}/test_work/llama_hf ${PROJECT_SOURCE_DIR})
  set_tests_properties(zo2_opt_llama_hf PROPERTIES ENVIRONMENT "ZO2_HF_PYTHON=${ZO2_HF_PYTHON}")
  set_tests_properties(zo2_opt_hf_export tokenizer_hf zo2_opt_llama_hf PROPERTIES TIMEOUT 300 LABELS "examples;hf")
endif()

# Data-parallel zo2-opt under mpiexec (examples/tests/dp_tests.sh, one CTest test per case): 2 and
# 4 ranks against one process with the same global batch, split queries, resume across rank
# counts, a killed and a hung rank, diverging replicas, bad combinations. Skipped, saying why,
# where zo2-opt has no MPI or mpiexec is missing.
add_executable(zo2-compare-runs ${CMAKE_CURRENT_SOURCE_DIR}/../tests/mpi/compare_runs.cpp)
target_link_libraries(zo2-compare-runs PRIVATE zo2::zo2)
target_compile_options(zo2-compare-runs PRIVATE ${_zo2_examples_default_opt})
if(ZO2_BASH)
  if(TARGET zo2::mpi AND MPIEXEC_EXECUTABLE)
    set(_zo2_dp_launcher "${MPIEXEC_EXECUTABLE};${MPIEXEC_NUMPROC_FLAG};NP;${ZO2_MPIEXEC_FLAGS}")
  else()
    set(_zo2_dp_launcher "")
  endif()
  string(REPLACE ";" " " _zo2_dp_launcher "${_zo2_dp_launcher}")
  foreach(case batch np4 queries resume killed hung diverged errors gpu_shared_master)
    add_test(NAME zo2_opt_dp_${case}
             COMMAND ${ZO2_BASH} ${CMAKE_CURRENT_SOURCE_DIR}/tests/dp_tests.sh ${case} $<TARGET_FILE:zo2-opt>
                     ${CMAKE_CURRENT_BINARY_DIR}/test_work/dp_${case} $<TARGET_FILE:zo2-compare-runs>
                     "${_zo2_dp_launcher}")
    set_tests_properties(zo2_opt_dp_${case} PROPERTIES TIMEOUT 300 LABELS "examples;mpi" PROCESSORS 2
                         SKIP_REGULAR_EXPRESSION "SKIPPED:")
  endforeach()
endif()
