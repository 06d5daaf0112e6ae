# Checks that one instruction-set level's kernel objects define no external symbol outside their
# own namespace kraken::engine::cpu::<ISA> (engine/cpu/isa_kernels.h). Such a symbol (an inline
# function or template instance built with -march=x86-64-v4) could be the one copy the linker
# keeps for every caller, and end a process on an AVX2 CPU with SIGILL. Meant for the optimized
# build CI ships (label `symbols`): a sanitizer build inlines less and may keep shared helpers
# out of line, which is harmless there (those builds run on the machine that built them).
#   cmake -DNM=nm -DISA=avx512 "-DOBJECTS=a.o;b.o" -P isa_symbols_test.cmake
set(bad "")
set(count 0)
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} -C --defined-only --extern-only ${obj}
                  OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${out}")
  foreach(line IN LISTS lines)
    if(line STREQUAL "")
      continue()
    endif()
    math(EXPR count "${count} + 1")
    # The personality routine's data reference is emitted by every C++ object with unwinding.
    if(line MATCHES "kraken::engine::cpu::${ISA}::" OR line MATCHES "DW\\.ref\\.__gxx_personality_v0")
      continue()
    endif()
    # Instrumentation a sanitizer or coverage build adds (data, not code), and clang's
    # terminate trampoline (no vector code in it).
    if(line MATCHES "__odr_asan|__asan_|__sancov|sancov\\.|__clang_call_terminate")
      continue()
    endif()
    string(APPEND bad "\n  ${obj}: ${line}")
  endforeach()
endforeach()
if(count EQUAL 0)
  message(FATAL_ERROR "no symbols read from the ${ISA} kernel objects: ${OBJECTS}")
endif()
if(NOT bad STREQUAL "")
  message(FATAL_ERROR "the ${ISA} kernel objects define symbols outside kraken::engine::cpu::${ISA}:${bad}")
endif()
message(STATUS "${count} symbols, all in kraken::engine::cpu::${ISA} (or the personality reference)")
