// Fused per-sample squared norms of conv/linear weight gradients (METHODS.md §6), float32 in, float64 out.
//
// A sample's weight gradient (one group of a conv) is G = sum_t g_t a_t^T, with a_t the input patch at
// output position t (gathered on the fly from the layer input x: no im2col buffer) and g_t the output
// gradient there. Neither kernel ever stores G:
//   direct_sqnorm: each block forms one 16x16 tile of G in registers and adds its squares to out[b];
//   gram_sqnorm:   each block forms one 16x16 tile of (g_t.g_s) and (a_t.a_s) and adds their products.
// Launch: block (16, 16); grid (tiles, groups, batch); out[b] must be zeroed first.

#define TILE 16

struct Conv {
    int channels, height, width;       // layer input x [B, channels, height, width]
    int out_channels, out_h, out_w;    // output gradient g [B, out_channels, out_h, out_w]
    int kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

// Element k of input patch t (k runs over this group's channels x kh x kw, like the weight layout).
__device__ __forceinline__ float patch(const float* x, const Conv& c, int b, int group, int k, int t) {
    const int per_group = c.channels / c.groups;
    const int kernel = c.kh * c.kw;
    if (k >= per_group * kernel || t >= c.out_h * c.out_w) return 0.f;
    const int channel = group * per_group + k / kernel;
    const int i = (k % kernel) / c.kw, j = k % c.kw;
    const int y = (t / c.out_w) * c.sh - c.ph + i * c.dh;
    const int z = (t % c.out_w) * c.sw - c.pw + j * c.dw;
    if (y < 0 || y >= c.height || z < 0 || z >= c.width) return 0.f;
    return x[((size_t)b * c.channels + channel) * c.height * c.width + (size_t)y * c.width + z];
}

__device__ __forceinline__ float grad(const float* g, const Conv& c, int b, int group, int o, int t) {
    const int per_group = c.out_channels / c.groups;
    if (o >= per_group || t >= c.out_h * c.out_w) return 0.f;
    return g[((size_t)b * c.out_channels + group * per_group + o) * c.out_h * c.out_w + t];
}

__device__ void block_add(double value, double* target) {
    __shared__ double partial[TILE * TILE];
    const int lane = threadIdx.y * TILE + threadIdx.x;
    partial[lane] = value;
    __syncthreads();
    for (int stride = TILE * TILE / 2; stride > 0; stride >>= 1) {
        if (lane < stride) partial[lane] += partial[lane + stride];
        __syncthreads();
    }
    if (lane == 0) atomicAdd(target, partial[0]);
}

// grid.x = ceil(O/g / 16) * ceil(patch / 16) tiles of G
extern "C" __global__ void direct_sqnorm(const float* x, const float* g, Conv c, double* out) {
    const int b = blockIdx.z, group = blockIdx.y;
    const int patch_len = c.channels / c.groups * c.kh * c.kw;
    const int k_tiles = (patch_len + TILE - 1) / TILE;
    const int o0 = (blockIdx.x / k_tiles) * TILE, k0 = (blockIdx.x % k_tiles) * TILE;
    const int positions = c.out_h * c.out_w;
    __shared__ float g_tile[TILE][TILE + 1];
    __shared__ float a_tile[TILE][TILE + 1];
    float sum = 0.f;  // G[o0 + ty, k0 + tx]
    for (int t0 = 0; t0 < positions; t0 += TILE) {
        g_tile[threadIdx.y][threadIdx.x] = grad(g, c, b, group, o0 + threadIdx.y, t0 + threadIdx.x);
        a_tile[threadIdx.y][threadIdx.x] = patch(x, c, b, group, k0 + threadIdx.y, t0 + threadIdx.x);
        __syncthreads();
        for (int t = 0; t < TILE; ++t) sum += g_tile[threadIdx.y][t] * a_tile[threadIdx.x][t];
        __syncthreads();
    }
    block_add((double)sum * sum, out + b);
}

// grid.x = ceil(T / 16)^2 tiles of the T x T Gram matrices
extern "C" __global__ void gram_sqnorm(const float* x, const float* g, Conv c, double* out) {
    const int b = blockIdx.z, group = blockIdx.y;
    const int positions = c.out_h * c.out_w;
    const int t_tiles = (positions + TILE - 1) / TILE;
    const int t0 = (blockIdx.x / t_tiles) * TILE, s0 = (blockIdx.x % t_tiles) * TILE;
    const int patch_len = c.channels / c.groups * c.kh * c.kw;
    const int outs = c.out_channels / c.groups;
    __shared__ float left[TILE][TILE + 1];
    __shared__ float right[TILE][TILE + 1];
    float aa = 0.f, gg = 0.f;  // (a_t . a_s) and (g_t . g_s) for t = t0 + ty, s = s0 + tx
    for (int k0 = 0; k0 < patch_len; k0 += TILE) {
        left[threadIdx.y][threadIdx.x] = patch(x, c, b, group, k0 + threadIdx.x, t0 + threadIdx.y);
        right[threadIdx.y][threadIdx.x] = patch(x, c, b, group, k0 + threadIdx.x, s0 + threadIdx.y);
        __syncthreads();
        for (int k = 0; k < TILE; ++k) aa += left[threadIdx.y][k] * right[threadIdx.x][k];
        __syncthreads();
    }
    for (int o0 = 0; o0 < outs; o0 += TILE) {
        left[threadIdx.y][threadIdx.x] = grad(g, c, b, group, o0 + threadIdx.x, t0 + threadIdx.y);
        right[threadIdx.y][threadIdx.x] = grad(g, c, b, group, o0 + threadIdx.x, s0 + threadIdx.y);
        __syncthreads();
        for (int o = 0; o < TILE; ++o) gg += left[threadIdx.y][o] * right[threadIdx.x][o];
        __syncthreads();
    }
    block_add((double)aa * gg, out + b);
}

// Linear weight: ||g_b||^2 ||x_b||^2, one block per sample; x [B, in], g [B, out].
extern "C" __global__ void linear_sqnorm(const float* x, const float* g, int inputs, int outputs, double* out) {
    const int b = blockIdx.x, lane = threadIdx.y * TILE + threadIdx.x;
    double xx = 0.0, gg = 0.0;
    for (int i = lane; i < inputs; i += TILE * TILE) { const double v = x[(size_t)b * inputs + i]; xx += v * v; }
    for (int i = lane; i < outputs; i += TILE * TILE) { const double v = g[(size_t)b * outputs + i]; gg += v * v; }
    __shared__ double sums[2][TILE * TILE];
    sums[0][lane] = xx;
    sums[1][lane] = gg;
    __syncthreads();
    for (int stride = TILE * TILE / 2; stride > 0; stride >>= 1) {
        if (lane < stride) { sums[0][lane] += sums[0][lane + stride]; sums[1][lane] += sums[1][lane + stride]; }
        __syncthreads();
    }
    if (lane == 0) out[b] = sums[0][0] * sums[1][0];
}

// norms[b * stride + column] = sums[b]: one tap's per-sample norms into its column of the [B, L] output,
// on the device (the float64 sums become the output's dtype). Launch: block (16, 16); grid ceil(B / 256).
extern "C" __global__ void write_column_f32(const double* sums, float* norms, int batch, int stride, int column) {
    const int b = blockIdx.x * TILE * TILE + threadIdx.y * TILE + threadIdx.x;
    if (b < batch) norms[(size_t)b * stride + column] = (float)sums[b];
}

extern "C" __global__ void write_column_f64(const double* sums, double* norms, int batch, int stride, int column) {
    const int b = blockIdx.x * TILE * TILE + threadIdx.y * TILE + threadIdx.x;
    if (b < batch) norms[(size_t)b * stride + column] = sums[b];
}
