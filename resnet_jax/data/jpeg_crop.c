// Decode-and-crop of the training input: a window of a JPEG resized to out x out, decoding only
// the rows and columns the resize reads.
//
// libjpeg-turbo's jpeg_crop_scanline and jpeg_skip_scanlines (the calls behind tf.data's
// decode_and_crop_jpeg) skip the inverse DCT, upsampling and colour conversion outside the
// window, and decoding stops at its last row. The resize is Pillow's bilinear filter (antialiased:
// the triangle widens with the shrink) in Pillow's own integer arithmetic (Resample.c:
// precompute_coeffs, normalize_coeffs_8bpc, a horizontal then a vertical pass through 8-bit
// intermediates): the result is `Image.resize((out, out), BILINEAR, box=box)` of the whole
// decoded image as Pillow up to 12 computes it (later ones may run the vertical pass first, a
// grey level's difference here and there). The decode is libjpeg's accurate integer DCT with fancy
// upsampling, as simplejpeg's and PIL's, and its pixels are the whole image's. The filter
// coefficients are computed in double without fused multiply-adds (the build's
// -ffp-contract=off), so every CPU gets the same bytes.
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define PRECISION_BITS (32 - 8 - 2)

struct error_manager {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) {
  longjmp(((struct error_manager *)cinfo->err)->jump, 1);
}

// Warnings (a truncated file, extraneous bytes) are not errors: the decoder fills in and goes on,
// as tf.data's and PIL's do.
static void on_message(j_common_ptr cinfo) { (void)cinfo; }

// For each output pixel, its first input pixel, how many it reads, and their fixed-point weights.
typedef struct {
  int *bounds;
  int *weights;
  int taps;
} Filter;

static double triangle(double x) {
  x = fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Pillow's precompute_coeffs (bilinear, support 1) and normalize_coeffs_8bpc. `in0`, `in1` are
// floats as in Pillow, which takes the box in single precision.
static int make_filter(int in_size, float in0, float in1, int out_size, Filter *f) {
  double scale = (double)(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filterscale;
  int taps = (int)ceil(support) * 2 + 1;
  double *k = malloc(sizeof(double) * taps);
  f->taps = taps;
  f->bounds = malloc(sizeof(int) * 2 * out_size);
  f->weights = malloc(sizeof(int) * taps * out_size);
  if (!k || !f->bounds || !f->weights) {
    free(k);
    return -1;
  }
  for (int xx = 0; xx < out_size; xx++) {
    double center = in0 + (xx + 0.5) * scale, sum = 0.0, ss = 1.0 / filterscale;
    int xmin = (int)(center - support + 0.5);
    int xmax = (int)(center + support + 0.5);
    if (xmin < 0) xmin = 0;
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; x++) {
      k[x] = triangle((x + xmin - center + 0.5) * ss);
      sum += k[x];
    }
    for (int x = 0; x < taps; x++) {
      double w = x < xmax ? (sum != 0.0 ? k[x] / sum : k[x]) : 0.0;
      f->weights[xx * taps + x] =
          (int)(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
    }
    f->bounds[2 * xx] = xmin;
    f->bounds[2 * xx + 1] = xmax;
  }
  free(k);
  return 0;
}

static unsigned char clip8(int v) {
  if (v >= (1 << PRECISION_BITS << 8)) return 255;
  if (v <= 0) return 0;
  return (unsigned char)(v >> PRECISION_BITS);
}

// The JPEG `data` decoded at 1/denominator scale (1, 2, 4 or 8); the window (left, top, right,
// bottom) of it, given in pixels of the full-size image, resized to out_size x out_size RGB into
// `out`. Returns 0, or -1 with libjpeg's message in `error` (CMYK, a damaged header): the caller
// then decodes another way or names the file.
int resnet_jax_jpeg_crop_resize(const unsigned char *data, unsigned long size, int denominator,
                                double left, double top, double right, double bottom,
                                int out_size, unsigned char *out, char *error, int error_size) {
  struct jpeg_decompress_struct cinfo;
  struct error_manager err;
  Filter h = {0}, v = {0};
  unsigned char *volatile rows = NULL, *volatile temp = NULL;
  int *volatile allocated[4] = {0};
  int status = -1;

  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = on_error;
  err.pub.output_message = on_message;
  jpeg_create_decompress(&cinfo);
  if (setjmp(err.jump)) {
    char message[JMSG_LENGTH_MAX];
    (*cinfo.err->format_message)((j_common_ptr)&cinfo, message);
    snprintf(error, error_size, "%s", message);
    goto done;
  }
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;  // grey converts; CMYK cannot (libjpeg raises)
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.scale_num = 1;
  cinfo.scale_denom = denominator;
  jpeg_calc_output_dimensions(&cinfo);
  const int width = cinfo.output_width, height = cinfo.output_height;
  const double sx = (double)width / cinfo.image_width, sy = (double)height / cinfo.image_height;
  int failed = make_filter(width, (float)(left * sx), (float)(right * sx), out_size, &h);
  allocated[0] = h.bounds, allocated[1] = h.weights;
  failed |= make_filter(height, (float)(top * sy), (float)(bottom * sy), out_size, &v);
  allocated[2] = v.bounds, allocated[3] = v.weights;
  if (failed) {
    snprintf(error, error_size, "out of memory");
    goto done;
  }

  // The input pixels the two passes read: columns [x_first, x_last), rows [y_first, y_last).
  int x_first = h.bounds[0], x_last = 0;
  for (int xx = 0; xx < out_size; xx++)
    if (h.bounds[2 * xx] + h.bounds[2 * xx + 1] > x_last) x_last = h.bounds[2 * xx] + h.bounds[2 * xx + 1];
  const int y_first = v.bounds[0];
  const int y_last = v.bounds[2 * out_size - 2] + v.bounds[2 * out_size - 1];

  jpeg_start_decompress(&cinfo);
  // Fancy upsampling reads the neighbouring chroma samples, and the decoder treats the edges of
  // a cropped or skipped-to region as the image's edges: decoding one iMCU more on each side
  // keeps the pixels the resize reads exactly those of the whole image.
#if JPEG_LIB_VERSION >= 70
  const int mcu_w = cinfo.max_h_samp_factor * cinfo.min_DCT_h_scaled_size;
  const int mcu_h = cinfo.max_v_samp_factor * cinfo.min_DCT_v_scaled_size;
#else
  const int mcu_w = cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size;
  const int mcu_h = cinfo.max_v_samp_factor * cinfo.min_DCT_scaled_size;
#endif
  JDIMENSION x_offset = x_first > mcu_w ? x_first - mcu_w : 0;
  JDIMENSION crop_width = (x_last + mcu_w < width ? x_last + mcu_w : width) - x_offset;
  jpeg_crop_scanline(&cinfo, &x_offset, &crop_width);  // widens to whole iMCUs
  const int y_skip = y_first > 2 * mcu_h ? (y_first / mcu_h - 1) * mcu_h : 0;
  const int stride = (int)crop_width * 3, row_count = y_last - y_first;
  rows = malloc((size_t)stride * (y_last - y_skip));
  temp = malloc((size_t)out_size * 3 * row_count);
  if (!rows || !temp) {
    snprintf(error, error_size, "out of memory");
    jpeg_abort_decompress(&cinfo);
    goto done;
  }
  if (y_skip > 0) jpeg_skip_scanlines(&cinfo, y_skip);
  for (int read = 0; read < y_last - y_skip;) {
    JSAMPROW row = rows + (size_t)read * stride;
    int got = jpeg_read_scanlines(&cinfo, &row, 1);
    if (got <= 0) {
      snprintf(error, error_size, "ended before row %d", y_skip + read);
      jpeg_abort_decompress(&cinfo);
      goto done;
    }
    read += got;
  }
  jpeg_abort_decompress(&cinfo);  // the rows below the window are never decoded

  // Horizontal pass into 8-bit intermediates (Pillow's ImagingResampleHorizontal_8bpc).
  for (int y = 0; y < row_count; y++) {
    const unsigned char *in = rows + (size_t)(y + y_first - y_skip) * stride;
    unsigned char *mid = temp + (size_t)y * out_size * 3;
    for (int xx = 0; xx < out_size; xx++) {
      const int xmin = h.bounds[2 * xx] - (int)x_offset, n = h.bounds[2 * xx + 1];
      const int *k = h.weights + xx * h.taps;
      int s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < n; x++) {
        const unsigned char *p = in + (xmin + x) * 3;
        s0 += p[0] * k[x];
        s1 += p[1] * k[x];
        s2 += p[2] * k[x];
      }
      mid[3 * xx] = clip8(s0), mid[3 * xx + 1] = clip8(s1), mid[3 * xx + 2] = clip8(s2);
    }
  }
  // Vertical pass (ImagingResampleVertical_8bpc), a whole output row at a time (vectorises).
  int *sums = malloc(sizeof(int) * out_size * 3);
  if (!sums) {
    snprintf(error, error_size, "out of memory");
    goto done;
  }
  for (int yy = 0; yy < out_size; yy++) {
    const int ymin = v.bounds[2 * yy] - y_first, n = v.bounds[2 * yy + 1];
    const int *k = v.weights + yy * v.taps;
    for (int c = 0; c < out_size * 3; c++) sums[c] = 1 << (PRECISION_BITS - 1);
    for (int y = 0; y < n; y++) {
      const unsigned char *mid = temp + (size_t)(ymin + y) * out_size * 3;
      for (int c = 0; c < out_size * 3; c++) sums[c] += mid[c] * k[y];
    }
    unsigned char *o = out + (size_t)yy * out_size * 3;
    for (int c = 0; c < out_size * 3; c++) o[c] = clip8(sums[c]);
  }
  free(sums);
  status = 0;

done:
  jpeg_destroy_decompress(&cinfo);
  free(rows);
  free(temp);
  for (int i = 0; i < 4; i++) free(allocated[i]);
  return status;
}
