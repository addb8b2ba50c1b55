#!/usr/bin/env python3
"""Register / L1 microbenchmark of the 2:4 s8 rows kernel's instruction mixes on AVX-512 VNNI
(docs/design.md, "s8 rows kernel on AVX-512: mixed designs (session 6, s24i)").

Every loop is one inline-asm block (GCC cannot hoist, interchange or keep values in registers
across repetitions, which fooled the session-5 /tmp benchmark). Prints ns per vpdpbusd (64
products). Usage (under the shared CPU lock):
  flock /tmp/qllm-cpu.lock tools/microbench/s24_s8_mix.py
Part 1: fixed registers, 16 accumulators: vpdpbusd alone, the dense kernel's broadcast load +
vpdpbusd, vpermb + vpdpbusd (the shipped design), a 64-byte table load + vpdpbusd, and mixes of
L table pairs in 16 (the rest vpermb pairs).
Part 2: the mixed tile's step as the kernel ran it (per pair: index / values loads, 2 offsets,
2 weight broadcasts, 8 vpermb pairs interleaved with 8 table pairs at data-dependent offsets),
by the table bytes it cycles through; 'acc' variants also load and store the table half's 4 sums
per step (the window walk that keeps the table in L1).
"""
import os
import subprocess
import sys
import tempfile

CLOB = ", ".join(f'"xmm{r}"' for r in range(32))


def perm(i, acc):
    t = 26 + i % 2
    return [f"vpermb %%zmm{16 + i % 8}, %%zmm24, %%zmm{t}", f"vpdpbusd %%zmm25, %%zmm{t}, %%zmm{acc}"]


def tabpair(i, acc, off):
    t = 30 + i % 2
    return [f"vmovdqu64 {off}(%%rbx,%%rcx), %%zmm{t}", f"vpdpbusd %%zmm25, %%zmm{t}, %%zmm{acc}"]


def part1():
    v = []
    v.append(("dp", sum(([f"vpdpbusd %%zmm25, %%zmm{16 + i % 8}, %%zmm{i}"] for i in range(16)), [])))
    v.append(("dense_bcast", sum(([f"vpbroadcastd {4 * i}(%%rdx), %%zmm{26 + i % 2}",
                                   f"vpdpbusd %%zmm25, %%zmm{26 + i % 2}, %%zmm{i}"] for i in range(16)), [])))
    v.append(("vpermb", sum((perm(i, i) for i in range(16)), [])))
    v.append(("table", sum((tabpair(i, i, 64 * i) for i in range(16)), [])))
    for nl in (2, 4, 5, 6, 8, 10, 12):
        sl, li = [], 0
        for i in range(16):
            if (i * nl) // 16 != ((i + 1) * nl) // 16:
                sl += tabpair(i, i, 64 * li)
                li += 1
            else:
                sl += perm(i, i)
        v.append((f"mix_{nl}of16", sl))
    return v


def step(j, acc):
    L = [f"vmovdqa64 {j * 256}(%%rsi), %%zmm24", f"vmovdqa64 {j * 256 + 64}(%%rsi), %%zmm25",
         f"movslq {j * 64}(%%rdx), %%rax", f"movslq {j * 64 + 4}(%%rdx), %%r10",
         f"vpbroadcastd {j * 256 + 192}(%%rsi), %%zmm26", f"vpbroadcastd {j * 256 + 196}(%%rsi), %%zmm27"]
    T = [8 + 4 * (j % 2) + v for v in range(4)] if acc else [8 + v for v in range(4)] + [12 + v for v in range(4)]
    if acc:
        L += [f"vmovdqa64 {j * 256 + 64 * v}(%[ta]), %%zmm{T[v]}" for v in range(4)]
    for i in range(8):
        c, v = i // 4, i % 4
        tr = T[v] if acc else T[i]
        L += [f"vpermb %%zmm{16 + i}, %%zmm24, %%zmm{28 + i % 2}", f"vpdpbusd %%zmm25, %%zmm{28 + i % 2}, %%zmm{i}",
              f"vmovdqa64 {64 * v}(%%rcx,{'%%rax' if c == 0 else '%%r10'}), %%zmm{30 + i % 2}",
              f"vpdpbusd %%zmm{26 + c}, %%zmm{30 + i % 2}, %%zmm{tr}"]
    if acc:
        L += [f"vmovdqa64 %%zmm{T[v]}, {j * 256 + 64 * v}(%[ta])" for v in range(4)]
    return L


def part2(acc):
    L = ["1:"] + [f"vmovdqa64 {r * 128}(%%rdi), %%zmm{16 + r}" for r in range(8)]
    for j in range(8):
        L += step(j, acc)
    L += ["add $64, %%rdi", "add $2048, %%rsi", "add $512, %%rdx", "dec %%r8", "jnz 1b"]
    return L


def fn(name, lines, kind):
    asm = "\\n\\t".join(lines)
    if kind == 1:
        return f'''static void run_{name}(long iters, long mask) {{
  const unsigned char* b = tab; const unsigned char* d = wv; long c = 0;
  asm volatile("1:\\n\\t{asm}\\n\\tadd $1024, %%rcx\\n\\tand %[mask], %%rcx\\n\\tdec %[it]\\n\\tjnz 1b\\n\\t"
    : [it] "+r"(iters), "+c"(c) : "b"(b), "d"(d), [mask] "r"(mask) : "memory", "cc", {CLOB});
}}'''
    return f'''static void run_{name}(const unsigned char* xb, const unsigned char* dec, const int* offs, long nb, int32_t* ta) {{
  const unsigned char* t = tab;
  asm volatile("{asm}\\n\\t" : "+D"(xb), "+S"(dec), "+d"(offs), "+r"(nb) : "c"(t), [ta] "r"(ta) : "rax", "r10", "memory", "cc", {CLOB});
}}'''


def main():
    p1, out = part1(), []
    out += ["#include <chrono>", "#include <initializer_list>", "#include <cstdio>", "#include <cstdlib>", "#include <cstring>", "#include <cstdint>",
            "alignas(64) static unsigned char tab[128 * 9216];", "alignas(64) static unsigned char wv[4096];",
            "alignas(64) static unsigned char dec[128 * 256];", "alignas(64) static int offs[128 * 16];",
            "alignas(64) static unsigned char xb[8 * 128 * 16];", "alignas(64) static int32_t tacc[16 * 64 * 16];"]
    out += [fn(n, l, 1) for n, l in p1]
    out.append(fn("step", part2(False), 2))
    out.append(fn("step_acc", part2(True), 2))
    out.append("template <class F> double best(F f) { double b = 1e9; for (int r = 0; r < 15; ++r) {"
               " auto t0 = std::chrono::steady_clock::now(); f(); double s = std::chrono::duration<double>("
               "std::chrono::steady_clock::now() - t0).count(); if (s < b) b = s; } return b; }")
    body = ["int main() {", "  memset(tab, 1, sizeof tab); memset(wv, 2, sizeof wv); memset(dec, 3, sizeof dec);"
            " memset(xb, 4, sizeof xb); memset(tacc, 0, sizeof tacc);", "  const long it = 1000000;"]
    for n, _ in p1:
        body.append(f'  printf("part 1  %-16s %.3f\\n", "{n}", best([&] {{ run_{n}(it, 16383); }}) * 1e9 / (it * 16.0));')
    body.append("  for (int slabs : {1, 2, 3, 4, 16, 128}) {")
    body.append("    for (int p = 0; p < 128; ++p) for (int s = 0; s < 16; ++s) offs[p * 16 + s] = (p % slabs) * 9216 + (rand() % 36) * 256;")
    body.append('    const double a = best([&] { for (int r = 0; r < 1000; ++r) run_step(xb, dec, offs, 16, tacc); }) * 1e9 / (1000.0 * 16 * 8 * 16);')
    body.append('    const double b = best([&] { for (int r = 0; r < 1000; ++r) run_step_acc(xb, dec, offs, 16, tacc); }) * 1e9 / (1000.0 * 16 * 8 * 16);')
    body.append('    printf("part 2  table %4d KB: step %.3f  step+acc %.3f\\n", slabs * 9, a, b);')
    body.append("  }")
    body.append("}")
    src = "\n".join(out + body)
    with tempfile.TemporaryDirectory() as d:
        cc, exe = os.path.join(d, "mb.cc"), os.path.join(d, "mb")
        open(cc, "w").write(src)
        subprocess.run(["g++", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi", cc, "-o", exe], check=True)
        sys.stdout.flush()
        subprocess.run([exe], check=True)


if __name__ == "__main__":
    main()
