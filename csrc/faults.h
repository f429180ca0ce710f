// Generated from fastsel/validation/faults.py by `python fastsel/validation/faults.py`:
// do not edit. checks.cpp fills the templates (each {field} with its text) and raises
// the fault's exception type.
#pragma once

namespace fastsel {
namespace faults {

enum class Kind { Type, Value };

struct Fault {
  Kind kind;
  const char* text;
};

constexpr Fault LOGITS_DIM{Kind::Value, "logits must be [batch, classes] or [batch, classes, d1, ..., dk], got shape {shape}"};
constexpr Fault LOGITS_DTYPE{Kind::Type, "logits must be float32, float16 or bfloat16, got {dtype}; cast with .float()"};
constexpr Fault LOGITS_CLASSES{Kind::Value, "logits must have at least one class (dim 1), got shape {shape}"};
constexpr Fault LOGITS_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides} for shape {shape}; call .contiguous()"};
constexpr Fault TARGET_DTYPE{Kind::Type, "target must be int64 or int32 class indices, or float32, float16 or bfloat16 class probabilities, got {dtype}"};
constexpr Fault TARGET_PROBS_SHAPE{Kind::Value, "target holds class probabilities ({dtype}), so it must have the logits' shape {want}, got shape {shape}; class indices must be an int64 or int32 tensor"};
constexpr Fault TARGET_INDICES_SHAPE{Kind::Value, "target of class indices must have shape {want} (the logits' shape {logits} without the class dim), got shape {shape}"};
constexpr Fault TARGET_DEVICE{Kind::Value, "target is on {device} but logits is on {want}; move it with .to(logits.device)"};
constexpr Fault TARGET_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides} for shape {shape}; call .contiguous()"};
constexpr Fault LOSSES_DIM{Kind::Value, "losses must be 1-D [batch] (one loss per sample: reduce other dims first, e.g. .flatten(1).mean(1)), got shape {shape}"};
constexpr Fault LOSSES_DTYPE{Kind::Type, "losses must be a floating dtype, got {dtype}"};
constexpr Fault LOSSES_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides} for shape {shape}; call .contiguous()"};
constexpr Fault PROBS_DTYPE{Kind::Type, "{name} must be a floating dtype, got {dtype}"};
constexpr Fault PROBS_SHAPE{Kind::Value, "{name} must be 1-D with one entry per loss, shape {want}, got shape {shape}"};
constexpr Fault PROBS_DEVICE{Kind::Value, "{name} is on {device} but losses is on {want}; move it with .to(losses.device)"};
constexpr Fault PROBS_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides} for shape {shape}; call .contiguous()"};
constexpr Fault INDICES_DIM{Kind::Value, "indices must be 1-D [batch] (one sample index per row), got shape {shape}"};
constexpr Fault INDICES_DTYPE{Kind::Type, "indices must be int64 or int32, got {dtype}"};
constexpr Fault INDICES_LENGTH{Kind::Value, "indices has {length} entries but {of} has {batch} rows: one sample index per row"};
constexpr Fault INDICES_DEVICE{Kind::Value, "indices is on {device} but {of} is on {want}; move it with .to({of}.device)"};
constexpr Fault INDICES_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides} for shape {shape}; call .contiguous()"};
constexpr Fault CLASS_WEIGHT_DTYPE{Kind::Type, "class_weight must be float32, got {dtype}; cast with .float()"};
constexpr Fault CLASS_WEIGHT_SHAPE{Kind::Value, "class_weight must be 1-D with one entry per class, shape {want}, got shape {shape}"};
constexpr Fault CLASS_WEIGHT_DEVICE{Kind::Value, "class_weight is on {device} but logits is on {want}; move it with .to(logits.device)"};
constexpr Fault CLASS_WEIGHT_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides} for shape {shape}; call .contiguous()"};
constexpr Fault LABEL_SMOOTHING_RANGE{Kind::Value, "label_smoothing must be in [0, 1], got label_smoothing={value}"};
constexpr Fault EMA_RANGE{Kind::Value, "ema must be in (0, 1], got ema={value}"};
constexpr Fault REDUCTION_RANGE{Kind::Value, "reduction must be 0 (mean), 1 (sum) or 2 (none), the index in fastsel.layout.REDUCTIONS, got reduction={value}"};
constexpr Fault STATE_SIZE{Kind::Value, "state_loss must be 1-D with N + 1 >= 2 entries (N >= 1 samples and a scratch slot), got shape {shape}; pass the buffers of one SampleState (fastsel.backends.base.state_args)"};
constexpr Fault STATE_DTYPE{Kind::Type, "{name} must be {want}, got {dtype}; pass the buffers of one SampleState (fastsel.backends.base.state_args)"};
constexpr Fault STATE_LENGTH{Kind::Value, "{name} must be 1-D with {length} entries (N + 1, as state_loss), got shape {shape}; pass the buffers of one SampleState (fastsel.backends.base.state_args)"};
constexpr Fault STATE_VECTOR_LENGTH{Kind::Value, "{name} must be 1-D with {length} entries (its slots in fastsel/layout.py), got shape {shape}; pass the buffers of one SampleState (fastsel.backends.base.state_args)"};
constexpr Fault STATE_DEVICE{Kind::Value, "{name} is on {device} but {of} is on {want}; move the whole state with SampleState.to(device)"};
constexpr Fault STATE_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides}; pass the state's own buffers (SampleState.buffers()), not views"};
constexpr Fault ROWS_TOGETHER{Kind::Value, "member and rows must be given together (an epoch's EpochRows.args()) or both be None (every row counts); got member {member} and rows {rows}"};
constexpr Fault MEMBER_DTYPE{Kind::Type, "member must be torch.uint8 (the epoch's selection as a mask), got {dtype}; pass an epoch's EpochRows.args() (fastsel.rows.EpochRows(N))"};
constexpr Fault MEMBER_LENGTH{Kind::Value, "member must be 1-D with N + 1 = {length} entries (as long as the state's buffers), got shape {shape}; pass an epoch's EpochRows.args() (fastsel.rows.EpochRows(N))"};
constexpr Fault ROWS_DTYPE{Kind::Type, "rows must be torch.int64 (the epoch's row counters), got {dtype}; pass an epoch's EpochRows.args() (fastsel.rows.EpochRows(N))"};
constexpr Fault ROWS_LENGTH{Kind::Value, "rows must be 1-D with {length} entries (the slots ROW_* of fastsel/layout.py), got shape {shape}; pass an epoch's EpochRows.args() (fastsel.rows.EpochRows(N))"};
constexpr Fault ROWS_DEVICE{Kind::Value, "{name} is on {device} but {of} is on {want}; move the epoch's rows with EpochRows.to(device)"};
constexpr Fault ROWS_CONTIGUOUS{Kind::Value, "{name} must be contiguous, got strides {strides}; pass an epoch's EpochRows.args() (fastsel.rows.EpochRows(N))"};
constexpr Fault EPOCH_DTYPE{Kind::Type, "epoch must be a 0-d torch.int64 tensor (fastsel.rows.EpochRows.epoch, or torch.tensor(epoch)), got {dtype}"};
constexpr Fault EPOCH_SHAPE{Kind::Value, "epoch must be a 0-d tensor (fastsel.rows.EpochRows.epoch, or torch.tensor(epoch)), got shape {shape}"};
constexpr Fault EPOCH_DEVICE{Kind::Value, "epoch is on {device} but {of} is on {want}; create it there: torch.tensor(epoch, device={of}.device)"};
constexpr Fault EPOCH_RANGE{Kind::Value, "epoch must fit in int32 (the state's last_epoch), got epoch={value}"};

}  // namespace faults
}  // namespace fastsel
