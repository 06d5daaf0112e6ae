#include "engine/comm/gloo_communicator.h"

#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>

#include <exception>

namespace kraken::engine {

StatusOr<std::unique_ptr<GlooCommunicator>> GlooCommunicator::Create(const GlooOptions& o) {
  if (o.store == nullptr) return InvalidArgument("Gloo: no rendezvous store");
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return InvalidArgument("Gloo: rank ", o.rank, " is not in a world of size ", o.world_size);
  }
  std::unique_ptr<GlooCommunicator> c(new GlooCommunicator());
  c->rank_ = o.rank;
  c->world_ = o.world_size;
  c->timeout_ = o.timeout;
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = o.host;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    gloo::rendezvous::PrefixStore prefix("kraken", *o.store);
    auto context = std::make_shared<gloo::rendezvous::Context>(o.rank, o.world_size);
    context->setTimeout(o.timeout);
    context->connectFullMesh(prefix, device);
    c->context_ = context;
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        StrCat("Gloo rank ", o.rank, " of ", o.world_size, ": could not connect to its peers: ", e.what()));
  }
  c->thread_ = std::thread([p = c.get()] { p->Loop(); });
  return c;
}

GlooCommunicator::~GlooCommunicator() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

StatusOr<CollectiveHandle> GlooCommunicator::Enqueue(Op op, void* data, int64_t count, int root) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!failure_.ok()) return failure_;
  const uint64_t id = ++next_id_;
  queue_.push_back({id, op, data, count, root});
  cv_.notify_all();
  return CollectiveHandle{id};
}

StatusOr<CollectiveHandle> GlooCommunicator::StartAllReduceSum(float* data, int64_t count) {
  return Enqueue(Op::kAllReduce, data, count, 0);
}

Status GlooCommunicator::Wait(CollectiveHandle h) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return done_id_ >= h.id || !failure_.ok(); });
  return done_id_ >= h.id ? absl::OkStatus() : failure_;
}

Status GlooCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h, Enqueue(Op::kBroadcast, data, bytes, root));
  return Wait(h);
}

Status GlooCommunicator::Barrier() {
  KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h, Enqueue(Op::kBarrier, nullptr, 0, 0));
  return Wait(h);
}

void GlooCommunicator::Loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = queue_.front();
      queue_.pop_front();
    }
    Status result = absl::OkStatus();
    try {
      const uint32_t tag = static_cast<uint32_t>(job.id);  // each collective its own tag
      switch (job.op) {
        case Op::kAllReduce: {
          gloo::AllreduceOptions opts(context_);
          float* p = static_cast<float*>(job.data);
          opts.setInput(p, static_cast<size_t>(job.count));
          opts.setOutput(p, static_cast<size_t>(job.count));
          opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
          opts.setTag(tag);
          opts.setTimeout(timeout_);
          gloo::allreduce(opts);
          break;
        }
        case Op::kBroadcast: {
          gloo::BroadcastOptions opts(context_);
          opts.setOutput(static_cast<uint8_t*>(job.data), static_cast<size_t>(job.count));
          opts.setRoot(job.root);
          opts.setTag(tag);
          opts.setTimeout(timeout_);
          gloo::broadcast(opts);
          break;
        }
        case Op::kBarrier: {
          gloo::BarrierOptions opts(context_);
          opts.setTag(tag);
          opts.setTimeout(timeout_);
          gloo::barrier(opts);
          break;
        }
      }
    } catch (const std::exception& e) {
      result = absl::UnavailableError(StrCat("Gloo rank ", rank_, ": collective ", job.id, " failed: ", e.what()));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (result.ok()) {
        done_id_ = job.id;
      } else if (failure_.ok()) {
        failure_ = result;
        queue_.clear();
      }
    }
    cv_.notify_all();
  }
}

}  // namespace kraken::engine
