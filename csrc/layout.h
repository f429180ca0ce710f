// Generated from fastsel/layout.py by `python fastsel/layout.py`: do not edit.
#pragma once

namespace fastsel {
namespace layout {

constexpr int STAT_NONFINITE = 0;
constexpr int STAT_EPOCH_LOSS = 1;
constexpr int STAT_EPOCH_COUNT = 2;
constexpr int STAT_SIZE = 3;
constexpr int ERR_INDEX_COUNT = 0;
constexpr int ERR_INDEX_VALUE = 1;
constexpr int ERR_LABEL_COUNT = 2;
constexpr int ERR_LABEL_VALUE = 3;
constexpr int ERR_SIZE = 4;
constexpr int ROW_TRAINED = 0;
constexpr int ROW_SHARD = 1;
constexpr int ROW_CALLS = 2;
constexpr int ROW_STRAY_COUNT = 3;
constexpr int ROW_STRAY_VALUE = 4;
constexpr int ROW_OVER_COUNT = 5;
constexpr int ROW_OVER_VALUE = 6;
constexpr int ROW_OVER_EPOCH = 7;
constexpr int ROW_SIZE = 8;
constexpr int REDUCTION_MEAN = 0;
constexpr int REDUCTION_SUM = 1;
constexpr int REDUCTION_NONE = 2;

}  // namespace layout
}  // namespace fastsel
