/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The layout shared with user space (records, map keys and values, socket
 * options, counters), written once in crates/abi. Every BPF file takes it
 * from here and nowhere else, so a change of the ABI header's name or split
 * is made in this one place.
 */
#ifndef CONNREDIR_LIB_ABI_H
#define CONNREDIR_LIB_ABI_H

#include <connredir/abi.h>

#endif /* CONNREDIR_LIB_ABI_H */
