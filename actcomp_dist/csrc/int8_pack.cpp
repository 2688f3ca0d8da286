// The int8 storage's pack and unpack on CPU, one pass over the tensor each (see
// actcomp_dist/cpu_kernels.py for why and for how it is built). The values are those of the
// PyTorch-ops path in actcomp_dist/storage.py (Int8Absmax) bit for bit, for finite inputs:
//   absmax = max |x| over the group, floored at 2^-100
//   factor = fl(fl(1 / absmax) * 127)      (what `127.0 / absmax` computes on a tensor)
//   code   = round_half_even(fl(x * factor))
//   scale  = fl(absmax / 127)
//   unpack = fl(code * scale), rounded to nearest even into bf16 for a bf16 result.
// Build with -ffp-contract=off: a fused multiply-add would round x * factor + 1.5 * 2^23 once
// instead of twice and change some codes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

constexpr uint32_t kMinAbsmaxBits = 0x0d800000u;  // 2^-100, storage.MIN_ABSMAX
constexpr float kRoundingShift = 12582912.0f;     // 1.5 * 2^23
constexpr int64_t kGrainRows = 64;

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// fp32 bits of element i of a row: bf16 is the top half of an fp32.
struct LoadFloat {
  const uint32_t* row;
  uint32_t operator()(int64_t i) const { return row[i]; }
};
struct LoadBFloat16 {
  const uint16_t* row;
  uint32_t operator()(int64_t i) const { return static_cast<uint32_t>(row[i]) << 16; }
};

// Calls fn with the group width as a compile-time constant for the usual widths (64; 32, a
// head dimension that 64 does not divide), whose loops then unroll into a few vector
// instructions instead of a loop per group, and with 0 (meaning "the runtime width") otherwise.
template <typename Fn>
void with_fixed_width(int64_t width, Fn&& fn) {
  if (width == 64) {
    fn(std::integral_constant<int64_t, 64>{});
  } else if (width == 32) {
    fn(std::integral_constant<int64_t, 32>{});
  } else {
    fn(std::integral_constant<int64_t, 0>{});
  }
}

template <typename Load>
inline void pack_group(Load load, int64_t width, int8_t* __restrict codes, float* scale) {
  // |x| of a finite float orders as the integer of its bits without the sign bit.
  uint32_t top = 0;
  for (int64_t i = 0; i < width; ++i) {
    uint32_t magnitude = load(i) & 0x7fffffffu;
    top = magnitude > top ? magnitude : top;
  }
  top = top < kMinAbsmaxBits ? kMinAbsmaxBits : top;
  const float absmax = bits_float(top);
  const float factor = (1.0f / absmax) * 127.0f;
  for (int64_t i = 0; i < width; ++i) {
    const float scaled = bits_float(load(i)) * factor;  // |scaled| <= 127 (1 + 2u)
    // Adding 1.5 * 2^23 leaves no fraction bits: the sum rounds to an integer, half to even.
    const float rounded = (scaled + kRoundingShift) - kRoundingShift;
    codes[i] = static_cast<int8_t>(static_cast<int32_t>(rounded));
  }
  *scale = absmax / 127.0f;
}

std::tuple<at::Tensor, at::Tensor> int8_pack(const at::Tensor& x, int64_t width) {
  TORCH_CHECK(x.device().is_cpu(), "int8_pack: a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int8_pack: float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(width > 0 && x.numel() % width == 0, "int8_pack: group width ", width,
              " does not divide ", x.numel(), " elements");
  const at::Tensor input = x.contiguous();
  const int64_t groups = input.numel() / width;
  at::Tensor codes = at::empty({groups, width}, input.options().dtype(at::kChar));
  at::Tensor scales = at::empty({groups, 1}, input.options().dtype(at::kFloat));
  int8_t* code_data = codes.mutable_data_ptr<int8_t>();
  float* scale_data = scales.mutable_data_ptr<float>();
  const void* data = input.const_data_ptr();
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  auto pack_all = [&](auto fixed_width) {
    constexpr int64_t kFixed = decltype(fixed_width)::value;
    const int64_t w = kFixed > 0 ? kFixed : width;
    at::parallel_for(0, groups, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        if (bf16) {
          const LoadBFloat16 load{static_cast<const uint16_t*>(data) + g * w};
          pack_group(load, w, code_data + g * w, scale_data + g);
        } else {
          const LoadFloat load{static_cast<const uint32_t*>(data) + g * w};
          pack_group(load, w, code_data + g * w, scale_data + g);
        }
      }
    });
  };
  with_fixed_width(width, pack_all);
  return {codes, scales};
}

// Round to nearest even, as c10::BFloat16 does; a NaN stays a quiet NaN.
inline uint16_t bfloat16_bits(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

at::Tensor int8_unpack(const at::Tensor& codes, const at::Tensor& scales, at::ScalarType dtype) {
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu(), "int8_unpack: CPU tensors");
  TORCH_CHECK(codes.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8_unpack: int8 codes and float32 scales");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "int8_unpack: a float32 or bfloat16 result, got ", dtype);
  const at::Tensor code_input = codes.contiguous();
  const at::Tensor scale_input = scales.contiguous();
  const int64_t groups = scale_input.numel();
  TORCH_CHECK(groups > 0 && code_input.numel() % groups == 0, "int8_unpack: ",
              code_input.numel(), " codes do not split into ", groups, " groups");
  const int64_t width = code_input.numel() / groups;
  at::Tensor out = at::empty(code_input.sizes(), code_input.options().dtype(dtype));
  const int8_t* code_data = code_input.const_data_ptr<int8_t>();
  const float* scale_data = scale_input.const_data_ptr<float>();
  void* out_data = out.mutable_data_ptr();
  const bool bf16 = dtype == at::kBFloat16;
  auto unpack_all = [&](auto fixed_width) {
    constexpr int64_t kFixed = decltype(fixed_width)::value;
    const int64_t w = kFixed > 0 ? kFixed : width;
    at::parallel_for(0, groups, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int8_t* __restrict group = code_data + g * w;
        const float scale = scale_data[g];
        if (bf16) {
          uint16_t* __restrict dst = static_cast<uint16_t*>(out_data) + g * w;
          for (int64_t i = 0; i < w; ++i) {
            dst[i] = bfloat16_bits(static_cast<float>(group[i]) * scale);
          }
        } else {
          float* __restrict dst = static_cast<float*>(out_data) + g * w;
          for (int64_t i = 0; i < w; ++i) {
            dst[i] = static_cast<float>(group[i]) * scale;
          }
        }
      }
    });
  };
  with_fixed_width(width, unpack_all);
  return out;
}

}  // namespace

TORCH_LIBRARY(actcomp_dist, m) {
  m.def("int8_pack(Tensor x, int width) -> (Tensor, Tensor)");
  m.def("int8_unpack(Tensor codes, Tensor scales, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(actcomp_dist, CPU, m) {
  m.impl("int8_pack", int8_pack);
  m.impl("int8_unpack", int8_unpack);
}
