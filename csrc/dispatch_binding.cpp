// Python binding of the dispatch/combine kernels (module dsv3._dispatch_ext): argument checks with
// messages for users, output allocation, dtype dispatch, and the choice of the host or CUDA launcher
// by the tensors' device. The semantics of every op are documented in dsv3/kernels/dispatch.py.
#include "binding_common.h"

namespace dsv3 {
namespace {

// ------------------------------------------------------------------------------------------------

std::vector<at::Tensor> layout(const at::Tensor& topk_in, int64_t n_experts, int64_t n_ranks, int64_t align,
                               int64_t chunk) {
  const char* op = "dispatch_layout";
  check_index(topk_in, op, "topk_idx", 2);
  TORCH_CHECK(n_experts >= 1, op, ": n_experts must be >= 1, got ", n_experts);
  TORCH_CHECK(n_ranks >= 1 && n_experts % n_ranks == 0, op, ": n_ranks must be >= 1 and divide n_experts=",
              n_experts, " (experts are split evenly and contiguously over ranks), got ", n_ranks);
  TORCH_CHECK(align >= 1, op, ": align must be >= 1, got ", align);
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  const at::Tensor topk = topk_in.contiguous();
  const int64_t n_tokens = topk.size(0), k = topk.size(1);
  const Routing routing{cptr<int64_t>(topk), n_tokens, k, n_experts, n_ranks, chunk};
  const auto i64 = topk.options().dtype(at::kLong);

  at::Tensor chunk_tokens = at::empty({routing.n_chunks(), n_ranks}, i64);
  at::Tensor chunk_pairs = at::empty({routing.n_chunks(), n_ranks}, i64);
  at::Tensor tokens_per_expert = at::zeros({n_experts}, i64);
  at::Tensor tokens_per_rank = at::empty({n_ranks}, i64), pairs_per_rank = at::empty({n_ranks}, i64);
  at::Tensor rank_offsets = at::empty({n_ranks}, i64), pair_offsets = at::empty({n_ranks}, i64);
  at::Tensor status = at::full({3}, kNoError, i64);  // first bad entry, send rows, pairs
  run(LayoutCount{routing, mptr<int64_t>(chunk_tokens), mptr<int64_t>(chunk_pairs), mptr<int64_t>(tokens_per_expert),
                  mptr<int64_t>(status)},
      topk);
  run(LayoutScan{routing.n_chunks(), n_ranks, mptr<int64_t>(chunk_tokens), mptr<int64_t>(chunk_pairs),
                 mptr<int64_t>(tokens_per_rank), mptr<int64_t>(pairs_per_rank)},
      topk);
  run(LayoutOffsets{n_ranks, align, cptr<int64_t>(tokens_per_rank), cptr<int64_t>(pairs_per_rank),
                    mptr<int64_t>(rank_offsets), mptr<int64_t>(pair_offsets), mptr<int64_t>(status) + 1},
      topk);
  // The one host sync: output sizes. The dispatcher needs the per-rank counts on the host for
  // all_to_all_single anyway.
  const at::Tensor host = status.cpu();
  const int64_t bad = host[0].item<int64_t>(), n_rows = host[1].item<int64_t>(), n_pairs = host[2].item<int64_t>();
  if (bad != kNoError) {
    const int64_t t = bad / k, j = bad % k, e = topk[t][j].item<int64_t>();
    TORCH_CHECK(e < -1 || e >= n_experts, op, ": topk_idx[", t, "] names expert ", e, " twice (at k=", j,
                "); a token's top-k experts must be distinct");
    TORCH_CHECK(false, op, ": topk_idx[", t, ", ", j, "] = ", e, " is not an expert id; accepted: 0..",
                n_experts - 1, ", or -1 for an unused slot");
  }

  at::Tensor token_row = at::empty({n_tokens, n_ranks}, i64);
  at::Tensor token_in_rank = at::empty({n_tokens, n_ranks}, topk.options().dtype(at::kBool));
  at::Tensor send_token = at::full({n_rows}, -1, i64), send_topk = at::full({n_rows, k}, -1, i64);
  at::Tensor pair_row = at::empty({n_tokens, k}, i64), pair_pos = at::empty({n_tokens, k}, i64);
  at::Tensor pair_src = at::empty({n_pairs}, i64);
  run(LayoutWrite{routing, cptr<int64_t>(chunk_tokens), cptr<int64_t>(chunk_pairs), cptr<int64_t>(rank_offsets),
                  cptr<int64_t>(pair_offsets), mptr<int64_t>(token_row), mptr<bool>(token_in_rank),
                  mptr<int64_t>(send_token), mptr<int64_t>(send_topk), mptr<int64_t>(pair_row),
                  mptr<int64_t>(pair_pos), mptr<int64_t>(pair_src)},
      topk);
  // Order = the fields of dsv3.kernels.dispatch.DispatchLayout.
  return {tokens_per_expert, tokens_per_rank, token_in_rank, token_row,      send_token, send_topk,
          rank_offsets,      pair_row,        pairs_per_rank, pair_pos,      pair_src,   pair_offsets};
}

// ------------------------------------------------------------------------------------------------

at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& src_in, const std::optional<at::Tensor>& row_scale_in,
                       std::optional<at::ScalarType> out_dtype) {
  const char* op = "gather_rows";
  check_rows(x_in, op, "x");
  check_index(src_in, op, "src_row", 1);
  check_same_device(x_in, src_in, op, "x", "src_row");
  const at::Tensor x = x_in.contiguous(), src = src_in.contiguous();
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  at::Tensor out = at::empty({src.size(0), x.size(1)}, x.options().dtype(out_type));
  at::Tensor slot = error_slot(x);

  if (!row_scale_in && out_type == x.scalar_type()) {
    // A pure copy: move the widest unit that divides the row and the alignment of both buffers.
    const int64_t row_bytes = x.size(1) * x.element_size();
    const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr());
    with_copy_unit(copy_unit(row_bytes, addr), [&](auto u) {
      using Unit = decltype(u);
      run(GatherCopy<Unit>{cptr<Unit>(x), cptr<int64_t>(src), LocalRows{static_cast<char*>(out.data_ptr()), row_bytes},
                           x.size(0), src.size(0), row_bytes / int64_t(sizeof(Unit)), mptr<int64_t>(slot)},
          x);
    });
    raise_bad_src(slot, src, x.size(0), op);
    return out;
  }

  at::Tensor row_scale;
  if (row_scale_in) {
    row_scale = row_scale_in->contiguous();
    TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.dim() == 1 && row_scale.size(0) == src.size(0),
                op, ": row_scale must be float32 of shape [", src.size(0), "] (one per output row), got ",
                row_scale.scalar_type(), " ", row_scale.sizes());
    check_same_device(x, row_scale, op, "x", "row_scale");
  }
  with_float_type(x.scalar_type(), op, "x", [&](auto in) {
    with_float_type(out_type, op, "out_dtype", [&](auto o) {
      using In = decltype(in);
      using Out = decltype(o);
      run(GatherScaled<In, Out>{cptr<In>(x), cptr<int64_t>(src), row_scale_in ? cptr<float>(row_scale) : nullptr,
                                local_rows(out), x.size(0), src.size(0), x.size(1), mptr<int64_t>(slot)},
          x);
    });
  });
  raise_bad_src(slot, src, x.size(0), op);
  return out;
}

std::vector<at::Tensor> gather_rows_fp8(const at::Tensor& x_in, const at::Tensor& src_in) {
  const char* op = "permute_fp8";
  check_rows(x_in, op, "x");
  check_index(src_in, op, "src_row", 1);
  check_same_device(x_in, src_in, op, "x", "src_row");
  const at::Tensor x = x_in.contiguous(), src = src_in.contiguous();
  const int64_t h = x.size(1), groups = ceil_div(h, kQuantGroup);
  at::Tensor q = at::empty({src.size(0), h}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = at::empty({src.size(0), groups}, x.options().dtype(at::kFloat));
  at::Tensor slot = error_slot(x);
  with_float_type(x.scalar_type(), op, "x", [&](auto in) {
    using In = decltype(in);
    run(GatherFp8<In>{cptr<In>(x), cptr<int64_t>(src), local_rows(q), local_rows(scales), x.size(0), src.size(0),
                      h, mptr<int64_t>(slot)},
        x);
  });
  raise_bad_src(slot, src, x.size(0), op);
  return {q, scales};
}

// ------------------------------------------------------------------------------------------------

void check_combine_args(const char* op, const at::Tensor& y, const at::Tensor& index) {
  check_rows(y, op, "y");
  check_index(index, op, "index", 2);
  check_same_device(y, index, op, "y", "index");
}

at::Tensor combine(const at::Tensor& y_in, const at::Tensor& index_in, const std::optional<at::Tensor>& weights_in,
                   std::optional<at::ScalarType> out_dtype) {
  const char* op = "combine";
  check_combine_args(op, y_in, index_in);
  const at::Tensor y = y_in.contiguous(), index = index_in.contiguous();
  const int64_t n_tokens = index.size(0), j = index.size(1), h = y.size(1);
  at::Tensor weights;
  if (weights_in) {
    weights = weights_in->contiguous();
    TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == index.sizes(), op,
                ": weights must be float32 with the shape of index ", index.sizes(), ", got ", weights.scalar_type(),
                " ", weights.sizes());
    check_same_device(y, weights, op, "y", "weights");
  }
  const at::ScalarType out_type = out_dtype.value_or(y.scalar_type());
  at::Tensor out = at::empty({n_tokens, h}, y.options().dtype(out_type));
  at::Tensor slot = error_slot(y);
  with_float_type(y.scalar_type(), op, "y", [&](auto in) {
    with_float_type(out_type, op, "out_dtype", [&](auto o) {
      using In = decltype(in);
      using Out = decltype(o);
      run(Combine<In, Out>{cptr<In>(y), cptr<int64_t>(index), weights_in ? cptr<float>(weights) : nullptr,
                           local_rows(out), y.size(0), n_tokens, j, h, mptr<int64_t>(slot)},
          y);
    });
  });
  raise_bad_index(slot, index, y.size(0), op);
  return out;
}

at::Tensor combine_weight_grad(const at::Tensor& dout_in, const at::Tensor& y_in, const at::Tensor& index_in) {
  const char* op = "combine_weight_grad";
  check_combine_args(op, y_in, index_in);
  check_rows(dout_in, op, "grad_out");
  check_same_device(y_in, dout_in, op, "y", "grad_out");
  TORCH_CHECK(dout_in.size(0) == index_in.size(0) && dout_in.size(1) == y_in.size(1), op, ": grad_out must be [",
              index_in.size(0), ", ", y_in.size(1), "] (tokens of index, hidden of y), got ", dout_in.sizes());
  const at::Tensor dout = dout_in.contiguous(), y = y_in.contiguous(), index = index_in.contiguous();
  at::Tensor dw = at::empty(index.sizes(), y.options().dtype(at::kFloat));
  at::Tensor slot = error_slot(y);
  with_float_type(dout.scalar_type(), op, "grad_out", [&](auto gt) {
    with_float_type(y.scalar_type(), op, "y", [&](auto in) {
      using G = decltype(gt);
      using In = decltype(in);
      run(CombineWeightGrad<G, In>{cptr<G>(dout), cptr<In>(y), cptr<int64_t>(index), mptr<float>(dw), y.size(0),
                                   index.size(0), index.size(1), y.size(1), mptr<int64_t>(slot)},
          y);
    });
  });
  raise_bad_index(slot, index, y.size(0), op);
  return dw;
}

at::Tensor invert_index(const at::Tensor& index_in, int64_t n_rows) {
  const char* op = "invert_index";
  TORCH_CHECK(index_in.scalar_type() == at::kLong, op, ": index must be int64, got ", index_in.scalar_type());
  TORCH_CHECK(n_rows >= 0, op, ": n_rows must be >= 0, got ", n_rows);
  const at::Tensor index = index_in.contiguous();
  at::Tensor inverse = at::full({n_rows}, -1, index.options().dtype(at::kLong));
  at::Tensor slot = error_slot(index);
  run(InvertIndex{cptr<int64_t>(index), mptr<int64_t>(inverse), index.numel(), n_rows, mptr<int64_t>(slot)}, index);
  if (const auto p = first_error(slot)) {
    const int64_t m = index.view(-1)[*p].item<int64_t>();
    TORCH_CHECK(m < -1 || m >= n_rows, op, ": row ", m, " is named by more than one entry (first at flat position ",
                *p, "); an invertible index names each row at most once");
    TORCH_CHECK(false, op, ": entry ", *p, " (flat) = ", m, " is not a row; accepted: 0..", n_rows - 1,
                ", or -1 for an unused slot");
  }
  return inverse;
}

}  // namespace
}  // namespace dsv3

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  dsv3::register_transport(m);
  m.doc() = "dsv3 expert-parallel dispatch/combine kernels (csrc/); the API is dsv3.kernels.dispatch";
  m.def("layout", &dsv3::layout, "counting-sort layout of top-k routing by destination rank", py::arg("topk_idx"),
        py::arg("n_experts"), py::arg("n_ranks"), py::arg("align"), py::arg("chunk"));
  m.def("gather_rows", &dsv3::gather_rows, "out[m] = row_scale[m] * x[src_row[m]]", py::arg("x"), py::arg("src_row"),
        py::arg("row_scale") = py::none(), py::arg("out_dtype") = py::none());
  m.def("gather_rows_fp8", &dsv3::gather_rows_fp8, "gather + 1x128 FP8 E4M3 quantization, power-of-2 scales",
        py::arg("x"), py::arg("src_row"));
  m.def("combine", &dsv3::combine, "out[t] = sum_j w[t,j] * y[index[t,j]] (fp32 accumulation)", py::arg("y"),
        py::arg("index"), py::arg("weights") = py::none(), py::arg("out_dtype") = py::none());
  m.def("combine_weight_grad", &dsv3::combine_weight_grad, "dw[t,j] = <grad_out[t], y[index[t,j]]>",
        py::arg("grad_out"), py::arg("y"), py::arg("index"));
  m.def("invert_index", &dsv3::invert_index, "inverse[index[e]] = e (flat e), -1 elsewhere", py::arg("index"),
        py::arg("n_rows"));
  m.attr("with_cuda") =
#ifdef DSV3_WITH_CUDA
      true;
#else
      false;
#endif
}
