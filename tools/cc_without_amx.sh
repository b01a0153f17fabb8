#!/bin/sh
# Compiler launcher for the llama.cpp peer build (see tools/llama_cpp_build.py): runs the
# compiler command as given, with AMX switched off after ggml's -march=native.
exec "$@" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
