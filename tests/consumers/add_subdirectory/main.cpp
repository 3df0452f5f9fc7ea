// The add_subdirectory consumer: all it does is name itself; the stack and the steps are in tiny_stack.hpp.
#include "tiny_stack.hpp"

int main() { return consumer::run("add_subdirectory"); }
