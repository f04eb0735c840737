# core/core.mk — the one list of the core's sources, included by the three
# builds (the top-level Makefile for the SQLite extension and the unit tests,
# pg_ext/Makefile for the Postgres extension, server/Makefile for the server).
# Set PGS_CORE_DIR to the core's directory as seen from the including
# Makefile before including this file.
#
# The server links the core as an archive (PGS_CORE_LIB rules in
# server/Makefile): the linker takes only the members it references, so the
# server gets the format (payload, values, clocks, cursors) without the apply
# and merge code that calls database.h.

PGS_CORE_DIR ?= core
PGS_CORE_SRC  = $(sort $(wildcard $(PGS_CORE_DIR)/*.c))
PGS_CORE_HDRS = $(PGS_CORE_DIR)/pgsync.h $(PGS_CORE_DIR)/../database.h
