# kraken_add_test(<name> SOURCES <files...> LIBS <targets...> LABELS <unit|model|integration|gpu>)
#
# One GoogleTest executable, registered test by test with gtest_discover_tests and labelled so
# CI can select (`ctest -L unit`) or exclude (`ctest -LE gpu`) whole groups. Tests find their
# data through KRAKEN_SOURCE_DIR and KRAKEN_BINARY_DIR in the environment. Each label also names a
# target that builds only its executables (`ninja tests-unit tests-model`), so a build that runs one
# group compiles nothing else.
function(kraken_add_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main kraken_compile_flags)
  gtest_discover_tests(${name}
    PROPERTIES
      LABELS "${ARG_LABELS}"
      ENVIRONMENT "KRAKEN_SOURCE_DIR=${PROJECT_SOURCE_DIR};KRAKEN_BINARY_DIR=${PROJECT_BINARY_DIR}"
    DISCOVERY_TIMEOUT 60)
  foreach(label IN LISTS ARG_LABELS)
    if(NOT TARGET tests-${label})
      add_custom_target(tests-${label})
    endif()
    add_dependencies(tests-${label} ${name})
  endforeach()
endfunction()
