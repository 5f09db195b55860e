/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Everything the kernel programs share with user space: the public
 * contract (uapi.h) and the layer's internal map layouts (maps.h). Kept so
 * the programs include one header; proxies include uapi.h alone.
 */
#ifndef CONNREDIR_ABI_H
#define CONNREDIR_ABI_H

#include "maps.h"

#endif /* CONNREDIR_ABI_H */
