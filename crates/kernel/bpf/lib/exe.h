/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The file name of the connecting process's executable:
 * current->mm->exe_file->f_path.dentry->d_name.name.
 *
 * No vmlinux.h: the kernel structures on the way are declared here (and
 * task_struct in service.h) with only the members read, and
 * preserve_access_index makes each member access a CO-RE relocation that
 * the loader resolves against the running kernel's BTF, as service.h's
 * start time already is. The pointers are walked as BTF pointers from
 * bpf_get_current_task_btf(): the verifier makes each load fault-safe, so
 * a process without an executable (no mm, or no exe_file) reads an empty
 * name, which no rule names.
 *
 * Without the BPF LSM there is no bpf_d_path(), so the full path is not
 * available here; the dentry's name is the last component of the path the
 * process was started from, symbolic links resolved (a hard link has its
 * own name), and a script's executable is its interpreter.
 */
#ifndef CONNREDIR_EXE_H
#define CONNREDIR_EXE_H

#include "service.h"

struct qstr {
	const unsigned char *name;
} __attribute__((preserve_access_index));

struct dentry {
	struct qstr d_name;
} __attribute__((preserve_access_index));

struct path {
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct file {
	struct path f_path;
} __attribute__((preserve_access_index));

struct mm_struct {
	struct file *exe_file;
} __attribute__((preserve_access_index));

/*
 * Reads the current process's executable file name into `buf` (`size`
 * bytes, which the caller zeroes: the helper writes the name and its NUL
 * only). A name of `size` bytes or more is cut to `size` - 1 bytes.
 */
static __always_inline void read_exe_name(void *buf, __u32 size)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = task->mm;
	struct file *exe;
	const unsigned char *name;

	if (!mm)
		return;
	exe = mm->exe_file;
	if (!exe)
		return;
	name = exe->f_path.dentry->d_name.name;
	if (name)
		bpf_probe_read_kernel_str(buf, size, name);
}

#endif /* CONNREDIR_EXE_H */
