#include "engine/comm/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include <gloo/rendezvous/store.h>

namespace kraken::engine {
namespace {

std::string CudaError(cudaError_t e) {
  return StrCat(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}
std::string NcclError(ncclResult_t r) {
  return StrCat("NCCL error ", static_cast<int>(r), " (", ncclGetErrorString(r), ")");
}

}  // namespace

StatusOr<int> CudaDeviceCount() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error state for later callers
    return FailedPrecondition("no usable CUDA device: cudaGetDeviceCount failed with ", CudaError(e));
  }
  if (n <= 0) return FailedPrecondition("no usable CUDA device: cudaGetDeviceCount reports 0 devices");
  return n;
}

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;   // communication stream
  cudaStream_t compute = nullptr;  // caller's stream, or null
  float* scratch = nullptr;        // one float for Barrier
  uint64_t next_id = 0;
  // In-flight collectives by handle id. With a compute stream the events carry timing: `start`
  // when the communication stream reaches the collective, `done` when it completes.
  struct InFlight {
    cudaEvent_t start = nullptr, done = nullptr;
  };
  std::unordered_map<uint64_t, InFlight> in_flight;
  // Waited collectives whose timing is read by TakeDeviceTiming: start, done, and `ready` (the
  // compute stream reached Wait).
  struct Timed {
    cudaEvent_t start, done, ready;
  };
  std::vector<Timed> timed;
};

namespace {

// Makes the communication stream wait for what the compute stream has enqueued so far.
void OrderAfterCompute(NcclCommunicator::Impl& im) {
  if (im.compute == nullptr) return;
  cudaEvent_t ready;
  cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
  cudaEventRecord(ready, im.compute);
  cudaStreamWaitEvent(im.stream, ready, 0);
  cudaEventDestroy(ready);  // released by CUDA once the wait has been satisfied
}

}  // namespace

Status NcclCommunicator::HostWaitStream() {
  cudaEvent_t done;
  cudaEventCreateWithFlags(&done, cudaEventDisableTiming);
  cudaEventRecord(done, impl_->stream);
  Status s = HostWait(done);
  cudaEventDestroy(done);
  return s;
}

StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(const NcclOptions& o) {
  if (o.world_size < 1) return InvalidArgument("world_size must be >= 1, got ", o.world_size);
  if (o.rank < 0 || o.rank >= o.world_size)
    return InvalidArgument("rank must be in [0, ", o.world_size, "), got ", o.rank);
  if (o.world_size > 1 && o.store == nullptr) return InvalidArgument("store is required when world_size > 1");
  KRAKEN_ASSIGN_OR_RETURN(int devices, CudaDeviceCount());
  if (o.device < 0 || o.device >= devices)
    return InvalidArgument("device must be in [0, ", devices, "), got ", o.device);
  if (cudaError_t e = cudaSetDevice(o.device); e != cudaSuccess)
    return FailedPrecondition("rank ", o.rank, ": cudaSetDevice(", o.device, ") failed with ", CudaError(e));

  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  const std::string key = o.key_prefix + "/nccl_id";
  if (o.world_size > 1) {
    try {
      if (o.rank == 0) {
        if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess)
          return absl::UnavailableError(StrCat("rank 0: ncclGetUniqueId failed: ", NcclError(r)));
        std::vector<char> bytes(reinterpret_cast<const char*>(&id), reinterpret_cast<const char*>(&id) + sizeof(id));
        o.store->set(key, bytes);
      } else {
        o.store->wait({key}, o.timeout);
        std::vector<char> bytes = o.store->get(key);
        if (bytes.size() != sizeof(id))
          return absl::UnavailableError(
              StrCat("rank ", o.rank, ": NCCL unique id has ", bytes.size(), " bytes, expected ", sizeof(id)));
        std::memcpy(&id, bytes.data(), sizeof(id));
      }
    } catch (const std::exception& e) {
      return absl::UnavailableError(StrCat("rank ", o.rank, ": NCCL unique id exchange failed: ", e.what()));
    }
  } else if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
    return absl::UnavailableError(StrCat("ncclGetUniqueId failed: ", NcclError(r)));
  }

  auto self = std::unique_ptr<NcclCommunicator>(new NcclCommunicator());
  self->rank_ = o.rank;
  self->world_ = o.world_size;
  self->timeout_ = o.timeout;
  self->impl_ = std::make_unique<Impl>();
  Impl& im = *self->impl_;
  im.compute = static_cast<cudaStream_t>(o.compute_stream);
  if (cudaError_t e = cudaStreamCreateWithFlags(&im.stream, cudaStreamNonBlocking); e != cudaSuccess)
    return absl::UnavailableError(StrCat("rank ", o.rank, ": cudaStreamCreate failed with ", CudaError(e)));
  if (cudaError_t e = cudaMalloc(&im.scratch, sizeof(float)); e != cudaSuccess)
    return absl::UnavailableError(StrCat("rank ", o.rank, ": cudaMalloc failed with ", CudaError(e)));
  if (ncclResult_t r = ncclCommInitRank(&im.comm, o.world_size, id, o.rank); r != ncclSuccess) {
    im.comm = nullptr;
    return absl::UnavailableError(StrCat("rank ", o.rank, ": ncclCommInitRank failed: ", NcclError(r)));
  }
  return self;
}

NcclCommunicator::~NcclCommunicator() {
  if (!impl_) return;
  Impl& im = *impl_;
  for (auto& [id, f] : im.in_flight) {
    if (f.start != nullptr) cudaEventDestroy(f.start);
    cudaEventDestroy(f.done);
  }
  for (const auto& t : im.timed) {
    cudaEventDestroy(t.start);
    cudaEventDestroy(t.done);
    cudaEventDestroy(t.ready);
  }
  if (im.comm != nullptr) {
    // After a failure the communicator may hang in destroy; abort is the documented way out.
    if (failure_.ok()) {
      cudaStreamSynchronize(im.stream);
      ncclCommDestroy(im.comm);
    } else {
      ncclCommAbort(im.comm);
    }
  }
  if (im.scratch != nullptr) cudaFree(im.scratch);
  if (im.stream != nullptr) cudaStreamDestroy(im.stream);
}

Status NcclCommunicator::Fail(const std::string& what) {
  if (failure_.ok()) {
    failure_ = absl::UnavailableError(StrCat("rank ", rank_, ": ", what));
    if (impl_ && impl_->comm != nullptr) {
      ncclCommAbort(impl_->comm);
      impl_->comm = nullptr;
    }
  }
  return failure_;
}

StatusOr<CollectiveHandle> NcclCommunicator::StartAllReduceSum(float* data, int64_t count) {
  if (!failure_.ok()) return failure_;
  if (count < 0) return InvalidArgument("AllReduce count must be >= 0, got ", count);
  Impl& im = *impl_;
  const bool timed = im.compute != nullptr;  // device timing only when Wait does not block the host
  const unsigned flags = timed ? cudaEventDefault : cudaEventDisableTiming;
  Impl::InFlight f;
  if (cudaEventCreateWithFlags(&f.done, flags) != cudaSuccess) return Fail("cudaEventCreate failed");
  if (timed && cudaEventCreateWithFlags(&f.start, flags) != cudaSuccess) {
    cudaEventDestroy(f.done);
    return Fail("cudaEventCreate failed");
  }
  OrderAfterCompute(im);  // the collective reads what the compute stream wrote to `data`
  if (f.start != nullptr) cudaEventRecord(f.start, im.stream);
  if (ncclResult_t r = ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat32, ncclSum, im.comm, im.stream);
      r != ncclSuccess) {
    if (f.start != nullptr) cudaEventDestroy(f.start);
    cudaEventDestroy(f.done);
    return Fail(StrCat("ncclAllReduce failed: ", NcclError(r)));
  }
  cudaEventRecord(f.done, im.stream);
  const uint64_t id = ++im.next_id;
  im.in_flight.emplace(id, f);
  return CollectiveHandle{id};
}

Status NcclCommunicator::HostWait(void* event_ptr) {
  auto event = static_cast<cudaEvent_t>(event_ptr);
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  while (true) {
    cudaError_t e = cudaEventQuery(event);
    if (e == cudaSuccess) return absl::OkStatus();
    if (e != cudaErrorNotReady) return Fail(StrCat("collective failed: ", CudaError(e)));
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(impl_->comm, &async) != ncclSuccess || async != ncclSuccess)
      return Fail(StrCat("collective failed (a peer is gone?): ", NcclError(async)));
    if (std::chrono::steady_clock::now() > deadline)
      return Fail(StrCat("collective did not finish within ", timeout_.count(), " ms"));
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

Status NcclCommunicator::Wait(CollectiveHandle handle) {
  if (!failure_.ok()) return failure_;
  Impl& im = *impl_;
  auto it = im.in_flight.find(handle.id);
  if (it == im.in_flight.end()) return InvalidArgument("unknown or already waited collective handle ", handle.id);
  const Impl::InFlight f = it->second;
  im.in_flight.erase(it);
  Status status = absl::OkStatus();
  if (im.compute != nullptr) {
    cudaEvent_t ready = nullptr;
    if (cudaEventCreateWithFlags(&ready, cudaEventDefault) == cudaSuccess) cudaEventRecord(ready, im.compute);
    if (cudaError_t e = cudaStreamWaitEvent(im.compute, f.done, 0); e != cudaSuccess)
      status = Fail(StrCat("cudaStreamWaitEvent failed with ", CudaError(e)));
    if (ready != nullptr) {
      im.timed.push_back({f.start, f.done, ready});
      return status;
    }
  } else {
    status = HostWait(f.done);
  }
  if (f.start != nullptr) cudaEventDestroy(f.start);
  cudaEventDestroy(f.done);
  return status;
}

bool NcclCommunicator::TakeDeviceTiming(DeviceCollectiveTiming* t) {
  if (!impl_ || impl_->compute == nullptr) return false;
  *t = DeviceCollectiveTiming{};
  for (const auto& e : impl_->timed) {
    float collective_ms = 0, ready_to_done_ms = 0;
    if (cudaEventElapsedTime(&collective_ms, e.start, e.done) == cudaSuccess &&
        cudaEventElapsedTime(&ready_to_done_ms, e.ready, e.done) == cudaSuccess) {
      t->collective_ns += static_cast<uint64_t>(std::max(0.f, collective_ms) * 1e6);
      // The compute stream stalled only if the collective finished after it reached Wait.
      t->exposed_ns += static_cast<uint64_t>(std::max(0.f, ready_to_done_ms) * 1e6);
      ++t->count;
    }
    cudaEventDestroy(e.start);
    cudaEventDestroy(e.done);
    cudaEventDestroy(e.ready);
  }
  impl_->timed.clear();
  return true;
}

Status NcclCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  if (!failure_.ok()) return failure_;
  if (root < 0 || root >= world_) return InvalidArgument("broadcast root must be in [0, ", world_, "), got ", root);
  if (bytes < 0) return InvalidArgument("broadcast bytes must be >= 0, got ", bytes);
  Impl& im = *impl_;
  OrderAfterCompute(im);
  if (ncclResult_t r = ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, im.comm, im.stream);
      r != ncclSuccess)
    return Fail(StrCat("ncclBroadcast failed: ", NcclError(r)));
  return HostWaitStream();
}

Status NcclCommunicator::Barrier() {
  if (!failure_.ok()) return failure_;
  Impl& im = *impl_;
  if (ncclResult_t r = ncclAllReduce(im.scratch, im.scratch, 1, ncclFloat32, ncclSum, im.comm, im.stream);
      r != ncclSuccess)
    return Fail(StrCat("barrier AllReduce failed: ", NcclError(r)));
  return HostWaitStream();
}

}  // namespace kraken::engine
