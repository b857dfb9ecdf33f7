// CPU twin of the fused PGD step (raw pointers, no torch headers; binding.cpp wraps it).
//
// L-inf reproduces the torch reference bit for bit: every intermediate is one IEEE
// rounding in the reference's order (x_adv + alpha*s with s in {-1,0,1}, so alpha*s is
// exact; x - eps and x + eps single roundings; max, min, clamp). Nothing here may be
// contracted into an FMA (random_init's `x + eps*noise` would change), hence the
// fp-contract pragma below; -ffast-math would break the contract and is refused.
//
// NaN: a NaN gradient counts as sign 0 (torch.sign(NaN) = NaN makes the reference's output
// NaN); a NaN in x_adv or x propagates through the projection only as far as the
// comparisons let it. Inputs are expected to be finite.

#include <cmath>
#include <cstdint>

#ifdef __FAST_MATH__
#error "pgd_step_cpu.cpp needs IEEE float semantics (its L-inf result is bit-exact with torch)"
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace saf_pgd {
namespace {

constexpr double kTiny = 1e-12;     // same guard as the torch reference
constexpr int64_t kGrain = 1 << 14;  // below this many elements, threads cost more than they save

template <typename T>
inline T clamp_to(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

template <typename T>
void linf_step(const T* xa, const T* __restrict__ g, const T* __restrict__ x, T* out, int64_t n,
               T alpha, T eps, T lo, T hi) {
  const T nalpha = -alpha;
#pragma omp parallel for simd schedule(static) if (n > kGrain)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const T s = gi > T(0) ? alpha : (gi < T(0) ? nalpha : T(0));
    T v = xa[i] + s;
    const T xl = x[i] - eps;
    const T xh = x[i] + eps;
    v = v < xl ? xl : v;
    v = v > xh ? xh : v;
    out[i] = clamp_to(v, lo, hi);
  }
}

// Per-sample sums for the L2 step, in double: |x_adv - x|^2, <x_adv - x, g>, |g|^2. With them
// |x_adv + a*g - x|^2 = dd + 2a*dg + a^2*gg, so one read of the inputs gives both norms.
template <typename T>
void l2_sums(const T* xa, const T* g, const T* x, int64_t d, double* dd, double* dg,
             double* gg) {
  double sdd = 0, sdg = 0, sgg = 0;
#pragma omp simd reduction(+ : sdd, sdg, sgg)
  for (int64_t i = 0; i < d; ++i) {
    const double gi = g[i];
    const double di = double(xa[i]) - double(x[i]);
    sdd += di * di;
    sdg += di * gi;
    sgg += gi * gi;
  }
  *dd = sdd;
  *dg = sdg;
  *gg = sgg;
}

template <typename T>
void l2_step(const T* xa, const T* g, const T* x, T* out, int64_t b, int64_t d, double alpha,
             double eps, T lo, T hi) {
#pragma omp parallel for schedule(static) if (b * d > kGrain)
  for (int64_t s = 0; s < b; ++s) {
    const int64_t o = s * d;
    double dd, dg, gg;
    l2_sums(xa + o, g + o, x + o, d, &dd, &dg, &gg);
    const double a = alpha / (std::sqrt(gg) + kTiny);
    const double dn = std::sqrt(std::fmax(dd + 2.0 * a * dg + a * a * gg, 0.0));
    const T af = T(a);
    const T sc = T(std::fmin(eps / (dn + kTiny), 1.0));
    const T* xas = xa + o;
    const T* gs = g + o;
    const T* xs = x + o;
    T* os = out + o;
    // Same order as the reference: nxt = x_adv + a*g; delta = nxt - x; x + scale*delta.
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const T nxt = xas[i] + af * gs[i];
      const T delta = nxt - xs[i];
      os[i] = clamp_to(xs[i] + sc * delta, lo, hi);
    }
  }
}

template <typename T>
void linf_init(const T* x, const T* noise, T* out, int64_t n, T eps, T lo, T hi) {
#pragma omp parallel for simd schedule(static) if (n > kGrain)
  for (int64_t i = 0; i < n; ++i) {
    const T r = eps * noise[i];
    out[i] = clamp_to(x[i] + r, lo, hi);
  }
}

// noise is (b, d + 1): a standard-normal direction and, last, the radius draw u.
template <typename T>
void l2_init(const T* x, const T* noise, T* out, int64_t b, int64_t d, double eps, T lo, T hi) {
#pragma omp parallel for schedule(static) if (b * d > kGrain)
  for (int64_t s = 0; s < b; ++s) {
    const T* ns = noise + s * (d + 1);
    double nn = 0;
#pragma omp simd reduction(+ : nn)
    for (int64_t i = 0; i < d; ++i) nn += double(ns[i]) * double(ns[i]);
    const double u = std::fmin(std::fabs(double(ns[d])), 1.0);
    const double radius = eps * std::pow(u, 1.0 / double(d));
    const T r = T(radius / (std::sqrt(nn) + kTiny));
    const T* xs = x + s * d;
    T* os = out + s * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) os[i] = clamp_to(xs[i] + ns[i] * r, lo, hi);
  }
}

}  // namespace

// Non-template entry points declared in binding.cpp.
void linf_step_f32(const float* xa, const float* g, const float* x, float* out, int64_t n,
                   float alpha, float eps, float lo, float hi) {
  linf_step<float>(xa, g, x, out, n, alpha, eps, lo, hi);
}
void linf_step_f64(const double* xa, const double* g, const double* x, double* out, int64_t n,
                   double alpha, double eps, double lo, double hi) {
  linf_step<double>(xa, g, x, out, n, alpha, eps, lo, hi);
}
void l2_step_f32(const float* xa, const float* g, const float* x, float* out, int64_t b,
                 int64_t d, double alpha, double eps, float lo, float hi) {
  l2_step<float>(xa, g, x, out, b, d, alpha, eps, lo, hi);
}
void l2_step_f64(const double* xa, const double* g, const double* x, double* out, int64_t b,
                 int64_t d, double alpha, double eps, double lo, double hi) {
  l2_step<double>(xa, g, x, out, b, d, alpha, eps, lo, hi);
}
void linf_init_f32(const float* x, const float* noise, float* out, int64_t n, float eps,
                   float lo, float hi) {
  linf_init<float>(x, noise, out, n, eps, lo, hi);
}
void linf_init_f64(const double* x, const double* noise, double* out, int64_t n, double eps,
                   double lo, double hi) {
  linf_init<double>(x, noise, out, n, eps, lo, hi);
}
void l2_init_f32(const float* x, const float* noise, float* out, int64_t b, int64_t d,
                 double eps, float lo, float hi) {
  l2_init<float>(x, noise, out, b, d, eps, lo, hi);
}
void l2_init_f64(const double* x, const double* noise, double* out, int64_t b, int64_t d,
                 double eps, double lo, double hi) {
  l2_init<double>(x, noise, out, b, d, eps, lo, hi);
}

}  // namespace saf_pgd
