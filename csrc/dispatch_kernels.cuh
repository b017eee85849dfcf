// Expert-parallel dispatch/combine kernels, written once. Each kernel is a struct holding its
// arguments whose call operator is the body of one (block, thread) of a grid, with a grid-stride loop
// over the kernel's items. nvcc launches the bodies as CUDA kernels (launch_cuda.cu); g++ runs the
// same bodies as an OpenMP loop over blocks (launch_host.cpp). Threads of a block never talk: no
// shared memory, no __syncthreads, no warp shuffles. Every output element is written by exactly one
// item, and atomics only ever add integers, so every result is independent of the grid shape, of the
// thread count and of scheduling: runs are reproducible bit for bit.
//
// Index contract shared by all kernels: int64 indices, -1 means "nothing" (a masked top-k slot, a
// padding row); anything else outside [0, n) is an error (see report_bad_index).
#pragma once

#include "portable.cuh"

namespace dsv3 {

struct Grid {
  int64_t block, n_blocks, thread, n_threads;
  DSV3_HD int64_t first() const { return block * n_threads + thread; }
  DSV3_HD int64_t stride() const { return n_blocks * n_threads; }
};

// ---------------------------------------------------------------------------------------------
// Layout: a counting sort of the (token, k) routing entries by destination rank, chunked over
// tokens. count: per (chunk, rank) histograms; scan: per rank, exclusive prefix over chunks;
// offsets: rank segment boundaries; write: each (chunk, rank) item walks its tokens in order and
// hands out consecutive positions. The result is the unique stable order "by rank, then by token"
// (pairs: "by rank, then by (token, k)"), so it cannot depend on the chunk size or on atomics.
// ---------------------------------------------------------------------------------------------

struct Routing {
  const int64_t* topk;  // [n_tokens, k], expert ids in [0, n_experts) or -1
  int64_t n_tokens, k, n_experts, n_ranks, chunk;
  DSV3_HD int64_t experts_per_rank() const { return n_experts / n_ranks; }
  DSV3_HD int64_t n_chunks() const { return ceil_div(n_tokens, chunk); }
};

struct LayoutCount {
  Routing r;
  int64_t* chunk_tokens;       // [n_chunks, n_ranks] tokens of the chunk that go to the rank
  int64_t* chunk_pairs;        // [n_chunks, n_ranks] (token, k) entries of the chunk on the rank
  int64_t* tokens_per_expert;  // [n_experts], zeroed by the caller
  int64_t* first_bad;          // smallest flat (t*k + j) of an out-of-range or repeated expert

  DSV3_HD int64_t n_items() const { return r.n_chunks() * r.n_ranks; }

  DSV3_HD void operator()(Grid g) const {
    const int64_t epr = r.experts_per_rank();
    for (int64_t i = g.first(); i < n_items(); i += g.stride()) {
      const int64_t chunk = i / r.n_ranks, rank = i % r.n_ranks;
      const int64_t end = min_i64(r.n_tokens, (chunk + 1) * r.chunk);
      int64_t tokens = 0, pairs = 0;
      for (int64_t t = chunk * r.chunk; t < end; ++t) {
        const int64_t* row = r.topk + t * r.k;
        bool needed = false;
        for (int64_t j = 0; j < r.k; ++j) {
          const int64_t e = row[j];
          if (e < -1 || e >= r.n_experts) {
            if (rank == 0) atomic_min(first_bad, t * r.k + j);  // one rank reports, once
            continue;
          }
          if (e < 0 || e / epr != rank) continue;
          // A repeated expert would make the rank's row count and the expert's count disagree.
          for (int64_t j2 = 0; j2 < j; ++j2)
            if (row[j2] == e) atomic_min(first_bad, t * r.k + j);
          atomic_add(tokens_per_expert + e, 1);
          ++pairs;
          needed = true;
        }
        tokens += needed ? 1 : 0;
      }
      chunk_tokens[i] = tokens;
      chunk_pairs[i] = pairs;
    }
  }
};

struct LayoutScan {
  int64_t n_chunks, n_ranks;
  int64_t* chunk_tokens;  // in: counts; out: exclusive prefix over chunks, per rank
  int64_t* chunk_pairs;   // same for pairs
  int64_t* tokens_per_rank;
  int64_t* pairs_per_rank;

  DSV3_HD int64_t n_items() const { return n_ranks; }

  DSV3_HD void operator()(Grid g) const {
    for (int64_t rank = g.first(); rank < n_ranks; rank += g.stride()) {
      int64_t tokens = 0, pairs = 0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t i = c * n_ranks + rank;
        const int64_t ct = chunk_tokens[i], cp = chunk_pairs[i];
        chunk_tokens[i] = tokens;
        chunk_pairs[i] = pairs;
        tokens += ct;
        pairs += cp;
      }
      tokens_per_rank[rank] = tokens;
      pairs_per_rank[rank] = pairs;
    }
  }
};

struct LayoutOffsets {  // one item: ranks are few, and this saves a host round trip
  int64_t n_ranks, align;
  const int64_t* tokens_per_rank;
  const int64_t* pairs_per_rank;
  int64_t* rank_offsets;  // [n_ranks] cumulative ends of the padded send segments
  int64_t* pair_offsets;  // [n_ranks] cumulative ends of the return segments
  int64_t* totals;        // [2] send rows (padded), pairs

  DSV3_HD int64_t n_items() const { return 1; }

  DSV3_HD void operator()(Grid g) const {
    if (g.first() != 0) return;
    int64_t rows = 0, pairs = 0;
    for (int64_t rank = 0; rank < n_ranks; ++rank) {
      rows += ceil_div(tokens_per_rank[rank], align) * align;
      pairs += pairs_per_rank[rank];
      rank_offsets[rank] = rows;
      pair_offsets[rank] = pairs;
    }
    totals[0] = rows;
    totals[1] = pairs;
  }
};

struct LayoutWrite {
  Routing r;
  const int64_t* chunk_tokens;  // exclusive prefixes from LayoutScan
  const int64_t* chunk_pairs;
  const int64_t* rank_offsets;
  const int64_t* pair_offsets;
  int64_t* token_row;      // [n_tokens, n_ranks] send row of token t for rank r, or -1
  bool* token_in_rank;     // [n_tokens, n_ranks]
  int64_t* send_token;     // [send rows] token of each send row; padding rows keep the caller's -1
  int64_t* send_topk;      // [send rows, k] the row's experts local to its rank, else -1 (as filled)
  int64_t* pair_row;       // [n_tokens, k] send row that carries entry (t, j), or -1 where masked
  int64_t* pair_pos;       // [n_tokens, k] return row of entry (t, j), or -1 where masked
  int64_t* pair_src;       // [pairs] flat t*k + j of each return row

  DSV3_HD int64_t n_items() const { return r.n_chunks() * r.n_ranks; }

  DSV3_HD void operator()(Grid g) const {
    const int64_t epr = r.experts_per_rank();
    for (int64_t i = g.first(); i < n_items(); i += g.stride()) {
      const int64_t chunk = i / r.n_ranks, rank = i % r.n_ranks;
      const int64_t end = min_i64(r.n_tokens, (chunk + 1) * r.chunk);
      int64_t row = (rank ? rank_offsets[rank - 1] : 0) + chunk_tokens[i];
      int64_t pair = (rank ? pair_offsets[rank - 1] : 0) + chunk_pairs[i];
      for (int64_t t = chunk * r.chunk; t < end; ++t) {
        bool needed = false;
        for (int64_t j = 0; j < r.k; ++j) {
          const int64_t flat = t * r.k + j, e = r.topk[flat];
          if (e < 0) {
            if (rank == 0) pair_row[flat] = pair_pos[flat] = -1;  // masked: no rank's; rank 0 writes
            continue;
          }
          if (e / epr != rank) continue;
          pair_row[flat] = row;
          pair_pos[flat] = pair;
          pair_src[pair++] = flat;
          send_topk[row * r.k + j] = e - rank * epr;
          needed = true;
        }
        token_row[t * r.n_ranks + rank] = needed ? row : -1;
        token_in_rank[t * r.n_ranks + rank] = needed;
        if (needed) send_token[row++] = t;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Row movement. Every op is a gather: out row m reads input row src[m] (-1: a zero row). A scatter
// (the backward of a gather) is written as a gather through the inverse index, which the layout
// returns beside each forward index, so no output is ever written twice.
//
// Where output row m goes is the kernel's Rows parameter: row m of one local tensor (LocalRows), or
// any address per row (AddressedRows): the EP transport passes the rows' places in the receive
// buffers of the destination ranks, so the same bodies write a send buffer or a peer's memory.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTile = 8;  // columns per item in the converting kernels: 16-byte bf16 accesses

struct LocalRows {  // row m at base + m * row_bytes
  char* base;
  int64_t row_bytes;
  template <class T>
  DSV3_HD T* row(int64_t m) const { return reinterpret_cast<T*>(base + m * row_bytes); }
};

struct AddressedRows {  // row m at address[m] (every row aligned to its element type)
  const int64_t* address;
  template <class T>
  DSV3_HD T* row(int64_t m) const { return reinterpret_cast<T*>(address[m]); }
};

// Plain row copy in units of 1..16 bytes (the binding picks the widest unit that divides the row
// and the alignment): dtype-agnostic, so it also moves FP8 rows and their scale rows.
template <class Unit, class Rows = LocalRows>
struct GatherCopy {
  const Unit* x;
  const int64_t* src;
  Rows out;
  int64_t n_in, n_out, units;  // units per row
  int64_t* first_bad;

  DSV3_HD int64_t n_items() const { return n_out * units; }

  DSV3_HD void operator()(Grid g) const {
    for (int64_t i = g.first(); i < n_items(); i += g.stride()) {
      const int64_t m = i / units, c = i % units, s = src[m];
      if (s < -1 || s >= n_in) report_bad_index(first_bad, m, s, "gather_rows");
      out.template row<Unit>(m)[c] = (s >= 0 && s < n_in) ? x[s * units + c] : Unit{};
    }
  }
};

// out[m] = row_scale[m] * x[src[m]] converted In -> fp32 -> Out (row_scale may be null: 1).
template <class In, class Out, class Rows = LocalRows>
struct GatherScaled {
  const In* x;
  const int64_t* src;
  const float* row_scale;
  Rows out;
  int64_t n_in, n_out, h;
  int64_t* first_bad;

  DSV3_HD int64_t n_items() const { return n_out * ceil_div(h, kTile); }

  DSV3_HD void operator()(Grid g) const {
    const int64_t tiles = ceil_div(h, kTile);
    for (int64_t i = g.first(); i < n_items(); i += g.stride()) {
      const int64_t m = i / tiles, c0 = (i % tiles) * kTile, s = src[m];
      const bool valid = s >= 0 && s < n_in;
      if (s < -1 || s >= n_in) report_bad_index(first_bad, m, s, "gather_rows");
      const float scale = row_scale ? row_scale[m] : 1.0f;
      Out* row = out.template row<Out>(m);
DSV3_UNROLL
      for (int64_t c = 0; c < kTile; ++c)
        if (c0 + c < h) row[c0 + c] = from_float<Out>(valid ? scale * to_float(x[s * h + c0 + c]) : 0.0f);
    }
  }
};

// FP8 dispatch: gather and quantize 1x128 tiles with power-of-two scales, one item per tile so a
// tile's amax needs no cooperation between threads. The last tile of a row may be narrower
// (hidden sizes that are not multiples of 128). Dequantize as q * scale.
template <class In, class Rows = LocalRows>
struct GatherFp8 {
  const In* x;
  const int64_t* src;
  Rows q;       // rows of h E4M3 bytes
  Rows scales;  // rows of ceil(h / 128) fp32 scales
  int64_t n_in, n_out, h;
  int64_t* first_bad;

  DSV3_HD int64_t n_items() const { return n_out * ceil_div(h, kQuantGroup); }

  DSV3_HD void operator()(Grid g) const {
    const int64_t groups = ceil_div(h, kQuantGroup);
    for (int64_t i = g.first(); i < n_items(); i += g.stride()) {
      const int64_t m = i / groups, c0 = (i % groups) * kQuantGroup, s = src[m];
      const int64_t n = min_i64(kQuantGroup, h - c0);
      const bool valid = s >= 0 && s < n_in;
      if (s < -1 || s >= n_in) report_bad_index(first_bad, m, s, "permute_fp8");
      float amax = 0.0f;
      if (valid)
        for (int64_t c = 0; c < n; ++c) {
          const float a = bits_float(float_bits(to_float(x[s * h + c0 + c])) & 0x7fffffffu);
          amax = a > amax ? a : amax;
        }
      const float scale = pow2_scale(amax);
      const float inv = 1.0f / scale;  // exact: scale is a power of two within the normal range
      uint8_t* q_row = q.template row<uint8_t>(m);
      for (int64_t c = 0; c < n; ++c)
        q_row[c0 + c] = valid ? float_to_e4m3(to_float(x[s * h + c0 + c]) * inv) : uint8_t(0);
      scales.template row<float>(m)[i % groups] = scale;
    }
  }
};

// out[t] = sum_j w[t, j] * y[index[t, j]], accumulated in fp32 in the order j = 0, 1, ...
// (w null: unit weights, which makes it the backward of a permute: a scatter-add as a gather).
template <class In, class Out, class Rows = LocalRows>
struct Combine {
  const In* y;
  const int64_t* index;  // [n_tokens, j]
  const float* weights;  // [n_tokens, j] or null
  Rows out;              // n_tokens rows of h
  int64_t n_y, n_tokens, j, h;
  int64_t* first_bad;

  DSV3_HD int64_t n_items() const { return n_tokens * ceil_div(h, kTile); }

  DSV3_HD void operator()(Grid g) const {
    const int64_t tiles = ceil_div(h, kTile);
    for (int64_t i = g.first(); i < n_items(); i += g.stride()) {
      const int64_t t = i / tiles, c0 = (i % tiles) * kTile;
      float acc[kTile];
DSV3_UNROLL
      for (int64_t c = 0; c < kTile; ++c) acc[c] = 0.0f;
      for (int64_t s = 0; s < j; ++s) {
        const int64_t m = index[t * j + s];
        if (m < -1 || m >= n_y) report_bad_index(first_bad, t * j + s, m, "combine");
        if (m < 0 || m >= n_y) continue;
        const float w = weights ? weights[t * j + s] : 1.0f;
DSV3_UNROLL
        for (int64_t c = 0; c < kTile; ++c)
          if (c0 + c < h) acc[c] += w * to_float(y[m * h + c0 + c]);
      }
      Out* row = out.template row<Out>(t);
DSV3_UNROLL
      for (int64_t c = 0; c < kTile; ++c)
        if (c0 + c < h) row[c0 + c] = from_float<Out>(acc[c]);
    }
  }
};

// Gradient of combine w.r.t. its weights: dw[t, j] = <dout[t], y[index[t, j]]> in fp32, summed
// over the hidden dim in order (0 where index is -1).
template <class G, class In>
struct CombineWeightGrad {
  const G* dout;  // [n_tokens, h]
  const In* y;    // [n_y, h]
  const int64_t* index;
  float* dw;      // [n_tokens, j]
  int64_t n_y, n_tokens, j, h;
  int64_t* first_bad;

  DSV3_HD int64_t n_items() const { return n_tokens * j; }

  DSV3_HD void operator()(Grid g) const {
    for (int64_t i = g.first(); i < n_items(); i += g.stride()) {
      const int64_t t = i / j, m = index[i];
      if (m < -1 || m >= n_y) report_bad_index(first_bad, i, m, "combine_weight_grad");
      float acc = 0.0f;
      if (m >= 0 && m < n_y)
        for (int64_t c = 0; c < h; ++c) acc += to_float(dout[t * h + c]) * to_float(y[m * h + c]);
      dw[i] = acc;
    }
  }
};

// inverse[index[e]] = e for every flat entry e with index[e] >= 0; the caller fills inverse with -1.
// Two entries naming one row is an error; every entry of a collision is reported (the exchange
// hands the previous writer to the next), so the smallest reported position is deterministic.
struct InvertIndex {
  const int64_t* index;
  int64_t* inverse;
  int64_t n_entries, n_rows;
  int64_t* first_bad;

  DSV3_HD int64_t n_items() const { return n_entries; }

  DSV3_HD void operator()(Grid g) const {
    for (int64_t i = g.first(); i < n_entries; i += g.stride()) {
      const int64_t m = index[i];
      if (m < -1 || m >= n_rows) report_bad_index(first_bad, i, m, "invert_index");
      if (m < 0 || m >= n_rows) continue;
      const int64_t previous = atomic_exchange(inverse + m, i);
      if (previous != -1) report_bad_index(first_bad, min_i64(previous, i), m, "invert_index");
    }
  }
};

// Every kernel type the launchers instantiate (X is called with a type; variadic for the commas).
#define DSV3_FOR_EACH_TYPED(X, T)                                                            \
  X(GatherScaled<T, float>) X(GatherScaled<T, bf16_t>) X(GatherScaled<T, f16_t>)             \
  X(Combine<T, float>) X(Combine<T, bf16_t>) X(Combine<T, f16_t>)                            \
  X(CombineWeightGrad<T, float>) X(CombineWeightGrad<T, bf16_t>) X(CombineWeightGrad<T, f16_t>) \
  X(GatherFp8<T>)

#define DSV3_FOR_EACH_KERNEL(X)                                                              \
  X(LayoutCount) X(LayoutScan) X(LayoutOffsets) X(LayoutWrite) X(InvertIndex)                \
  X(GatherCopy<uint8_t>) X(GatherCopy<uint16_t>) X(GatherCopy<uint32_t>)                     \
  X(GatherCopy<uint64_t>) X(GatherCopy<u128_t>)                                              \
  DSV3_FOR_EACH_TYPED(X, float) DSV3_FOR_EACH_TYPED(X, bf16_t) DSV3_FOR_EACH_TYPED(X, f16_t)

}  // namespace dsv3
