// Python binding of the intranode EP transport (protocol: transport_kernels.cuh; driven by
// dsv3/parallel/ep_transport.py): memory every rank of a node maps (POSIX shared memory; CUDA IPC in
// the CUDA build), the row kernels writing straight into peers' receive buffers, and the flags.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "binding_common.h"

#ifdef DSV3_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace dsv3 {
namespace {

// ------------------------------------------------------------------------------------------------
// POSIX shared memory: a segment per rank and buffer, created by its owner and mapped by every rank
// of the node. The Python side unlinks each name once every peer has mapped it, so nothing is left
// in /dev/shm whichever way the processes end.

std::string errno_text() { return std::string(std::strerror(errno)); }

int64_t shm_create(const std::string& name, int64_t nbytes) {
  TORCH_CHECK(nbytes > 0, "shm_create: nbytes must be > 0, got ", nbytes);
  const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  TORCH_CHECK(fd >= 0, "shm_create: shm_open(", name, ") failed: ", errno_text());
  // Reserve the pages now: a tmpfs that runs out of room would otherwise kill the process with
  // SIGBUS at the first write into the mapping, in the middle of an exchange.
  const int err = ::posix_fallocate(fd, 0, nbytes);
  if (err != 0) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    TORCH_CHECK(false, "the EP transport could not reserve ", nbytes, " bytes of shared memory (", name,
                "): ", std::strerror(err), ". /dev/shm is too small for the exchange buffers: enlarge it (docker: "
                "--shm-size), or use parallel.ep_transport=all_to_all");
  }
  void* p = ::mmap(nullptr, size_t(nbytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const std::string why = p == MAP_FAILED ? errno_text() : "";
  ::close(fd);
  if (p == MAP_FAILED) ::shm_unlink(name.c_str());
  TORCH_CHECK(p != MAP_FAILED, "shm_create: mmap of ", nbytes, " bytes (", name, ") failed: ", why);
  return reinterpret_cast<int64_t>(p);
}

int64_t shm_map(const std::string& name, int64_t nbytes) {
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0600);
  TORCH_CHECK(fd >= 0, "shm_map: shm_open(", name, ") failed: ", errno_text(),
              " (the owning rank must create it before its peers map it)");
  struct stat st {};
  TORCH_CHECK(::fstat(fd, &st) == 0 && st.st_size >= nbytes, "shm_map: ", name, " holds ", st.st_size,
              " bytes, expected ", nbytes);
  void* p = ::mmap(nullptr, size_t(nbytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const std::string why = p == MAP_FAILED ? errno_text() : "";
  ::close(fd);
  TORCH_CHECK(p != MAP_FAILED, "shm_map: mmap of ", nbytes, " bytes (", name, ") failed: ", why);
  return reinterpret_cast<int64_t>(p);
}

void shm_unlink_name(const std::string& name) {
  TORCH_CHECK(::shm_unlink(name.c_str()) == 0 || errno == ENOENT, "shm_unlink(", name, ") failed: ", errno_text());
}

void shm_unmap(int64_t address, int64_t nbytes) {
  TORCH_CHECK(::munmap(reinterpret_cast<void*>(address), size_t(nbytes)) == 0, "munmap failed: ", errno_text());
}

// ------------------------------------------------------------------------------------------------
// CUDA IPC: a cudaMalloc'd buffer per rank, its handle exchanged once, opened by every peer
// (peer access over NVLink or PCIe enabled lazily by the driver).

#ifdef DSV3_WITH_CUDA
void cuda_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "the EP transport's ", what, " failed: ", cudaGetErrorString(err));
}
#endif

[[noreturn]] void no_cuda(const char* what) {
  TORCH_CHECK(false, what, ": this build of dsv3._dispatch_ext has no CUDA (it was built against a CPU build of "
                           "torch); reinstall with a CUDA torch and nvcc for GPU buffers");
}

py::tuple cuda_ipc_alloc(int64_t nbytes, int64_t device) {
#ifdef DSV3_WITH_CUDA
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* p = nullptr;
  cuda_check(cudaMalloc(&p, size_t(nbytes)), "cudaMalloc of an exchange buffer");
  cuda_check(cudaMemset(p, 0, size_t(nbytes)), "cudaMemset");
  cudaIpcMemHandle_t handle;
  cuda_check(cudaIpcGetMemHandle(&handle, p), "cudaIpcGetMemHandle");
  return py::make_tuple(reinterpret_cast<int64_t>(p),
                        py::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle)));
#else
  (void)nbytes, (void)device;
  no_cuda("cuda_ipc_alloc");
#endif
}

int64_t cuda_ipc_open(const py::bytes& handle_bytes, int64_t device) {
#ifdef DSV3_WITH_CUDA
  const std::string h = handle_bytes;
  TORCH_CHECK(h.size() == sizeof(cudaIpcMemHandle_t), "cuda_ipc_open: a handle has ", sizeof(cudaIpcMemHandle_t),
              " bytes, got ", h.size());
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, h.data(), sizeof(handle));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* p = nullptr;
  cuda_check(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess),
             "cudaIpcOpenMemHandle (the GPUs of an EP group must reach each other's memory: NVLink or PCIe P2P)");
  return reinterpret_cast<int64_t>(p);
#else
  (void)handle_bytes, (void)device;
  no_cuda("cuda_ipc_open");
#endif
}

void cuda_ipc_close(int64_t address, int64_t device) {
#ifdef DSV3_WITH_CUDA
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cuda_check(cudaIpcCloseMemHandle(reinterpret_cast<void*>(address)), "cudaIpcCloseMemHandle");
#else
  (void)address, (void)device;
  no_cuda("cuda_ipc_close");
#endif
}

void cuda_free(int64_t address, int64_t device) {
#ifdef DSV3_WITH_CUDA
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cuda_check(cudaFree(reinterpret_cast<void*>(address)), "cudaFree");
#else
  (void)address, (void)device;
  no_cuda("cuda_free");
#endif
}

// A tensor over memory the transport owns (no deleter: the mapping outlives every view it hands out).
at::Tensor view(int64_t address, std::vector<int64_t> shape, at::ScalarType dtype, at::Device device) {
  return torch::from_blob(reinterpret_cast<void*>(address), shape, at::TensorOptions().dtype(dtype).device(device));
}

// ------------------------------------------------------------------------------------------------
// Rows into peers' buffers: the row kernels of dispatch_kernels.cuh over AddressedRows.

void check_addresses(const at::Tensor& address, int64_t n_rows, const at::Tensor& like, const char* op) {
  check_index(address, op, "address", 1);
  TORCH_CHECK(address.size(0) == n_rows && address.is_contiguous(), op, ": address must be contiguous with ", n_rows,
              " entries (one per output row), got ", address.sizes());
  check_same_device(like, address, op, "x", "address");
}

at::Tensor row_addresses(const at::Tensor& seg_end, const at::Tensor& dst_row0, const at::Tensor& base,
                         int64_t n_rows, int64_t row_bytes) {
  const char* op = "row_addresses";
  for (const auto* t : {&seg_end, &dst_row0, &base}) {
    check_index(*t, op, "seg_end/dst_row0/base", 1);
    TORCH_CHECK(t->is_contiguous() && t->size(0) == seg_end.size(0) && t->device() == seg_end.device(), op,
                ": seg_end, dst_row0 and base must be contiguous, on one device, one entry per rank");
  }
  TORCH_CHECK(seg_end.size(0) >= 1 && n_rows >= 0 && row_bytes >= 0, op, ": bad sizes");
  at::Tensor address = at::empty({n_rows}, seg_end.options());
  run(RowAddresses{cptr<int64_t>(seg_end), cptr<int64_t>(dst_row0), cptr<int64_t>(base), seg_end.size(0), n_rows,
                   row_bytes, mptr<int64_t>(address)},
      seg_end);
  return address;
}

void put_rows(const at::Tensor& x_in, const at::Tensor& src_in, const at::Tensor& address,
              const std::optional<at::Tensor>& row_scale_in, std::optional<at::ScalarType> out_dtype) {
  const char* op = "put_rows";
  check_rows(x_in, op, "x");
  check_index(src_in, op, "src_row", 1);
  check_same_device(x_in, src_in, op, "x", "src_row");
  check_addresses(address, src_in.size(0), x_in, op);
  const at::Tensor x = x_in.contiguous(), src = src_in.contiguous();
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  const AddressedRows out{cptr<int64_t>(address)};
  at::Tensor slot = error_slot(x);
  if (!row_scale_in && out_type == x.scalar_type()) {
    // Destination rows are 128-byte aligned plus a multiple of the row size (ep_transport.py), so
    // a unit that divides the row and x's address divides every destination address too.
    const int64_t row_bytes = x.size(1) * x.element_size();
    with_copy_unit(copy_unit(row_bytes, reinterpret_cast<uintptr_t>(x.data_ptr())), [&](auto u) {
      using Unit = decltype(u);
      run(GatherCopy<Unit, AddressedRows>{cptr<Unit>(x), cptr<int64_t>(src), out, x.size(0), src.size(0),
                                          row_bytes / int64_t(sizeof(Unit)), mptr<int64_t>(slot)},
          x);
    });
  } else {
    at::Tensor row_scale;
    if (row_scale_in) {
      row_scale = row_scale_in->contiguous();
      TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.dim() == 1 && row_scale.size(0) == src.size(0),
                  op, ": row_scale must be float32 of shape [", src.size(0), "], got ", row_scale.scalar_type(), " ",
                  row_scale.sizes());
      check_same_device(x, row_scale, op, "x", "row_scale");
    }
    with_float_type(x.scalar_type(), op, "x", [&](auto in) {
      with_float_type(out_type, op, "out_dtype", [&](auto o) {
        using In = decltype(in);
        using Out = decltype(o);
        run(GatherScaled<In, Out, AddressedRows>{cptr<In>(x), cptr<int64_t>(src),
                                                 row_scale_in ? cptr<float>(row_scale) : nullptr, out, x.size(0),
                                                 src.size(0), x.size(1), mptr<int64_t>(slot)},
            x);
      });
    });
  }
  raise_bad_src(slot, src, x.size(0), op);
}

void put_rows_fp8(const at::Tensor& x_in, const at::Tensor& src_in, const at::Tensor& q_address,
                  const at::Tensor& scale_address) {
  const char* op = "put_rows_fp8";
  check_rows(x_in, op, "x");
  check_index(src_in, op, "src_row", 1);
  check_same_device(x_in, src_in, op, "x", "src_row");
  check_addresses(q_address, src_in.size(0), x_in, op);
  check_addresses(scale_address, src_in.size(0), x_in, op);
  const at::Tensor x = x_in.contiguous(), src = src_in.contiguous();
  at::Tensor slot = error_slot(x);
  with_float_type(x.scalar_type(), op, "x", [&](auto in) {
    using In = decltype(in);
    run(GatherFp8<In, AddressedRows>{cptr<In>(x), cptr<int64_t>(src), AddressedRows{cptr<int64_t>(q_address)},
                                     AddressedRows{cptr<int64_t>(scale_address)}, x.size(0), src.size(0), x.size(1),
                                     mptr<int64_t>(slot)},
        x);
  });
  raise_bad_src(slot, src, x.size(0), op);
}

void put_reduce(const at::Tensor& y_in, const at::Tensor& index_in, const at::Tensor& address,
                const std::optional<at::Tensor>& weights_in, std::optional<at::ScalarType> out_dtype) {
  const char* op = "put_reduce";
  check_rows(y_in, op, "y");
  check_index(index_in, op, "index", 2);
  check_same_device(y_in, index_in, op, "y", "index");
  check_addresses(address, index_in.size(0), y_in, op);
  const at::Tensor y = y_in.contiguous(), index = index_in.contiguous();
  at::Tensor weights;
  if (weights_in) {
    weights = weights_in->contiguous();
    TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == index.sizes(), op,
                ": weights must be float32 with the shape of index ", index.sizes(), ", got ", weights.scalar_type(),
                " ", weights.sizes());
    check_same_device(y, weights, op, "y", "weights");
  }
  const at::ScalarType out_type = out_dtype.value_or(y.scalar_type());
  at::Tensor slot = error_slot(y);
  with_float_type(y.scalar_type(), op, "y", [&](auto in) {
    with_float_type(out_type, op, "out_dtype", [&](auto o) {
      using In = decltype(in);
      using Out = decltype(o);
      run(Combine<In, Out, AddressedRows>{cptr<In>(y), cptr<int64_t>(index),
                                          weights_in ? cptr<float>(weights) : nullptr, AddressedRows{cptr<int64_t>(address)},
                                          y.size(0), index.size(0), index.size(1), y.size(1), mptr<int64_t>(slot)},
          y);
    });
  });
  raise_bad_index(slot, index, y.size(0), op);
}

// ------------------------------------------------------------------------------------------------
// Flags. On the host they run in the calling thread (one thread: the ordering argument of
// transport_kernels.cuh needs the signalling thread to follow the row kernel's OpenMP barrier, which
// the calling thread does); on the device they are kernels on the current stream.

template <class Body>
void run_serial(const Body& body, const at::Tensor& like) {
  if (like.is_cpu()) {
    if (body.n_items() > 0) body(Grid{0, 1, 0, 1});
    return;
  }
  run(body, like);
}

void check_flags(const at::Tensor& flags, const char* op) {
  check_index(flags, op, "flags", 1);
  TORCH_CHECK(flags.is_contiguous(), op, ": flags must be contiguous");
}

void signal(const at::Tensor& flags, int64_t value) {
  check_flags(flags, "signal");
  run_serial(Signal{cptr<int64_t>(flags), flags.size(0), value}, flags);
}

// Start time of a process in clock ticks after boot (field 22 of /proc/PID/stat), -1 if it is not
// visible from here; with the pid it names one process for good (pids are reused, start times not).
int64_t process_start_time(int64_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!f || !std::getline(f, line)) return -1;
  const auto close = line.rfind(')');  // the command name may itself contain spaces and parentheses
  if (close == std::string::npos) return -1;
  std::istringstream rest(line.substr(close + 1));
  std::string field;
  int64_t start = -1;
  for (int i = 3; i <= 22 && rest >> field; ++i) {
    if (i == 3 && (field == "Z" || field == "X")) return -1;  // exited, not yet reaped
    if (i == 22) start = std::stoll(field);
  }
  return start;
}

// Host wait: polls the flags with back-off (spin, then yield, then short sleeps: several ranks
// may share few cores, and a spinning waiter would starve the rank it waits for), and every
// 20 ms checks that the ranks it still waits for are alive and that the deadline has not passed.
void wait_flags_host(const at::Tensor& flags, int64_t target, double timeout_s, const at::Tensor& pids,
                     const at::Tensor& start_times, const std::string& what) {
  using clock = std::chrono::steady_clock;
  const int64_t n = flags.size(0);
  const auto t0 = clock::now();
  auto next_check = t0 + std::chrono::milliseconds(20);
  int64_t polls = 0, missing = n;
  {
    py::gil_scoped_release no_gil;
    for (;;) {
      missing = n;
      WaitFlags{cptr<int64_t>(flags), n, target, 0, &missing}(Grid{0, 1, 0, 1});
      if (missing == n) return;
      ++polls;
      const auto now = clock::now();
      if (now >= next_check) {
        next_check = now + std::chrono::milliseconds(20);
        const int64_t pid = cptr<int64_t>(pids)[missing], start = cptr<int64_t>(start_times)[missing];
        if (pid > 0 && process_start_time(pid) != start) break;
        if (std::chrono::duration<double>(now - t0).count() > timeout_s) break;
      }
      if (polls < 256) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(polls < 4096 ? 5 : 50));
      }
    }
  }
  const double waited = std::chrono::duration<double>(clock::now() - t0).count();
  const int64_t pid = cptr<int64_t>(pids)[missing], start = cptr<int64_t>(start_times)[missing];
  const int64_t seen = load_acquire(reinterpret_cast<const int64_t*>(cptr<int64_t>(flags)[missing]));
  TORCH_CHECK(!(pid > 0 && process_start_time(pid) != start), what, ": rank ", missing, " of the EP group (pid ", pid,
              ") exited while this rank waited for it (its flag holds ", seen, ", waiting for ", target, "); the job "
              "cannot continue");
  TORCH_CHECK(false, what, ": rank ", missing, " of the EP group (pid ", pid, ") did not reach round ", target,
              " within ", timeout_s, " s (its flag holds ", seen, ", waited ", waited, " s): it is stalled, or the ranks "
              "do not exchange in the same order");
}

void wait_flags(const at::Tensor& flags, int64_t target, double timeout_s, const at::Tensor& pids,
                const at::Tensor& start_times, const std::string& what) {
  const char* op = "wait_flags";
  check_flags(flags, op);
  TORCH_CHECK(pids.is_cpu() && start_times.is_cpu() && pids.scalar_type() == at::kLong &&
                  start_times.scalar_type() == at::kLong && pids.numel() == flags.numel() &&
                  start_times.numel() == flags.numel() && pids.is_contiguous() && start_times.is_contiguous(),
              op, ": pids and start_times must be contiguous int64 CPU tensors with one entry per flag");
  TORCH_CHECK(timeout_s > 0, op, ": timeout_s must be > 0, got ", timeout_s);
  if (flags.is_cpu()) return wait_flags_host(flags, target, timeout_s, pids, start_times, what);
  run(WaitFlags{cptr<int64_t>(flags), flags.size(0), target, int64_t(timeout_s * 1e9), nullptr}, flags);
}

}  // namespace

void register_transport(py::module_& m) {
  m.def("shm_create", &shm_create, "create, reserve and map a POSIX shared memory segment; returns its address",
        py::arg("name"), py::arg("nbytes"));
  m.def("shm_map", &shm_map, "map an existing POSIX shared memory segment; returns its address", py::arg("name"),
        py::arg("nbytes"));
  m.def("shm_unlink", &shm_unlink_name, "remove a segment's name (mappings stay valid)", py::arg("name"));
  m.def("shm_unmap", &shm_unmap, "unmap a segment", py::arg("address"), py::arg("nbytes"));
  m.def("cuda_ipc_alloc", &cuda_ipc_alloc, "cudaMalloc + IPC handle: (address, handle bytes)", py::arg("nbytes"),
        py::arg("device"));
  m.def("cuda_ipc_open", &cuda_ipc_open, "open a peer's IPC handle; returns the address", py::arg("handle"),
        py::arg("device"));
  m.def("cuda_ipc_close", &cuda_ipc_close, "close an opened IPC handle", py::arg("address"), py::arg("device"));
  m.def("cuda_free", &cuda_free, "free a buffer from cuda_ipc_alloc", py::arg("address"), py::arg("device"));
  m.def("view", &view, "a tensor over transport memory (no ownership)", py::arg("address"), py::arg("shape"),
        py::arg("dtype"), py::arg("device"));
  m.def("row_addresses", &row_addresses, "address of every send row in its destination's receive region",
        py::arg("seg_end"), py::arg("dst_row0"), py::arg("base"), py::arg("n_rows"), py::arg("row_bytes"));
  m.def("put_rows", &put_rows, "row m of row_scale[m] * x[src_row[m]] written at address[m]", py::arg("x"),
        py::arg("src_row"), py::arg("address"), py::arg("row_scale") = py::none(), py::arg("out_dtype") = py::none());
  m.def("put_rows_fp8", &put_rows_fp8, "gather + 1x128 E4M3 quantization written at q_address/scale_address",
        py::arg("x"), py::arg("src_row"), py::arg("q_address"), py::arg("scale_address"));
  m.def("put_reduce", &put_reduce, "row t of sum_j w[t,j] * y[index[t,j]] written at address[t]", py::arg("y"),
        py::arg("index"), py::arg("address"), py::arg("weights") = py::none(), py::arg("out_dtype") = py::none());
  m.def("signal", &signal, "store value to every flag (release)", py::arg("flags"), py::arg("value"));
  m.def("wait_flags", &wait_flags, "wait until every flag >= target (acquire), with timeout and liveness checks",
        py::arg("flags"), py::arg("target"), py::arg("timeout_s"), py::arg("pids"), py::arg("start_times"),
        py::arg("what"));
  m.def("process_start_time", &process_start_time, "start time of a process (/proc), -1 if not visible",
        py::arg("pid"));
}

}  // namespace dsv3
