;; Block quantization (model/quantize.ts) in WebAssembly SIMD. Hot loops make no calls: V8 does not inline
;; WebAssembly functions, and a call per 4 weights cost a third of the time.
;; int8 (q8f16, q8f32), 4 weights per step, the same codes and scales as int8BlocksF16 / int8BlocksF32 (model/quantize.ts), bit for bit (test/quant-kernels.test.ts):
;;   scale = fl32(amax / 127), inv = scale ? fl32(1 / scale) : 0, code = round-half-away(fl32(x · inv)) + 128,
;; NaN weights are skipped by amax and coded 128; every f32 product and quotient here is rounded once, as
;; Math.fround of the double result is. Rounding: f32x4.nearest rounds half to even, so a lane exactly halfway (|y − r|
;; = 0.5, exact here) takes y + copysign(0.5, y) instead, exact for such y; a NaN lane truncates to 0, code 128.
;; Blocks are whole: blockSize a multiple of 16, rows a multiple of blockSize.
;; The memory is shared and imported: helper threads (model/quant-kernels.ts, QuantPool) run the same kernels on
;; other blocks of the same chunk, each with its own `tmp`. 16384 pages (1 GiB) bound it; a chunk needs tens of MiB.
;; Regenerate model/quant-kernels.wasm.ts after an edit: npm run build:wasm.
(module
  (import "env" "memory" (memory 1 16384 shared))

  ;; A finite half's magnitude bits (≤ 0x7c00, infinity) as a float32.
  (func $half (param $a i32) (result f32)
    (if (result f32) (i32.eq (local.get $a) (i32.const 0x7c00))
      (then (f32.const inf))
      (else (f32.mul (f32.reinterpret_i32 (i32.shl (local.get $a) (i32.const 13))) (f32.const 0x1p112)))))

  (func $inverse (param $scale f32) (result v128)
    (f32x4.splat (select (f32.div (f32.const 1) (local.get $scale)) (f32.const 0) (f32.ne (local.get $scale) (f32.const 0)))))

  ;; `blocks` blocks of `bs` binary16 weights at `src` → bs codes each at `codes`, one float32 scale each at `scales`.
  (func (export "q8f16") (param $src i32) (param $blocks i32) (param $bs i32) (param $codes i32) (param $scales i32)
    (local $end i32) (local $p i32) (local $amax v128) (local $v v128) (local $scale f32) (local $inv v128)
    (local $x v128) (local $mag v128) (local $y v128) (local $r v128) (local $c v128)
    (block $done
      (loop $block
        (br_if $done (i32.eqz (local.get $blocks)))
        (local.set $end (i32.add (local.get $src) (i32.shl (local.get $bs) (i32.const 1))))
        ;; amax on the bits: |x| orders like its bits with the sign cleared; NaNs (above infinity's bits) skipped.
        (local.set $amax (v128.const i32x4 0 0 0 0))
        (local.set $p (local.get $src))
        (loop $scan
          (local.set $v (v128.and (v128.load (local.get $p)) (v128.const i16x8 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff)))
          (local.set $amax (i16x8.max_s (local.get $amax)
            (v128.andnot (local.get $v) (i16x8.gt_s (local.get $v) (v128.const i16x8 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00)))))
          (local.set $p (i32.add (local.get $p) (i32.const 16)))
          (br_if $scan (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $amax (i16x8.max_s (local.get $amax) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $amax) (local.get $amax))))
        (local.set $amax (i16x8.max_s (local.get $amax) (i8x16.shuffle 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 (local.get $amax) (local.get $amax))))
        (local.set $amax (i16x8.max_s (local.get $amax) (i8x16.shuffle 2 3 0 1 2 3 0 1 2 3 0 1 2 3 0 1 (local.get $amax) (local.get $amax))))
        (local.set $scale (f32.div (call $half (i16x8.extract_lane_u 0 (local.get $amax))) (f32.const 127)))
        (f32.store (local.get $scales) (local.get $scale))
        (local.set $inv (call $inverse (local.get $scale)))
        (local.set $p (local.get $src))
        ;; 4 weights a step. A half's value, exactly: its magnitude bits moved into a float32's place and scaled by
        ;; 2^112 (subnormal halves included); infinities and NaNs, which that makes finite, are coded 128 below, as
        ;; the reference codes them (an infinite amax makes inv 0, and ∞·0 is NaN).
        (loop $quant
          (local.set $x (i32x4.extend_low_i16x8_u (v128.load64_zero (local.get $p))))
          (local.set $mag (v128.and (local.get $x) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)))
          (local.set $y
            (f32x4.mul
              (f32x4.mul
                (v128.or (i32x4.shl (local.get $mag) (i32.const 13))
                         (i32x4.shl (v128.and (local.get $x) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16)))
                (v128.const i32x4 0x77800000 0x77800000 0x77800000 0x77800000))
              (local.get $inv)))
          (local.set $r (f32x4.nearest (local.get $y)))
          (local.set $r
            (v128.bitselect
              (f32x4.add (local.get $y) (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000)) (v128.const f32x4 0.5 0.5 0.5 0.5)))
              (local.get $r)
              (f32x4.eq (f32x4.abs (f32x4.sub (local.get $y) (local.get $r))) (v128.const f32x4 0.5 0.5 0.5 0.5))))
          (local.set $c (i32x4.trunc_sat_f32x4_s (local.get $r)))
          (local.set $c (v128.andnot (local.get $c) (i32x4.gt_s (local.get $mag) (v128.const i32x4 0x7bff 0x7bff 0x7bff 0x7bff))))
          (local.set $c (i32x4.add (local.get $c) (v128.const i32x4 128 128 128 128)))
          (local.set $c (i16x8.narrow_i32x4_s (local.get $c) (local.get $c)))
          (v128.store32_lane 0 (local.get $codes) (i8x16.narrow_i16x8_u (local.get $c) (local.get $c)))
          (local.set $codes (i32.add (local.get $codes) (i32.const 4)))
          (local.set $p (i32.add (local.get $p) (i32.const 8)))
          (br_if $quant (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $src (local.get $end))
        (local.set $scales (i32.add (local.get $scales) (i32.const 4)))
        (local.set $blocks (i32.sub (local.get $blocks) (i32.const 1)))
        (br $block))))

  ;; The same over float32 weights. amax by pmax (a < b ? b : a), which keeps the running amax over a NaN.
  (func (export "q8f32") (param $src i32) (param $blocks i32) (param $bs i32) (param $codes i32) (param $scales i32)
    (local $end i32) (local $p i32) (local $amax v128) (local $scale f32) (local $inv v128) (local $y v128) (local $r v128) (local $c v128)
    (block $done
      (loop $block
        (br_if $done (i32.eqz (local.get $blocks)))
        (local.set $end (i32.add (local.get $src) (i32.shl (local.get $bs) (i32.const 2))))
        (local.set $amax (v128.const i32x4 0 0 0 0))
        (local.set $p (local.get $src))
        (loop $scan
          (local.set $amax (f32x4.pmax (local.get $amax) (f32x4.abs (v128.load (local.get $p)))))
          (local.set $p (i32.add (local.get $p) (i32.const 16)))
          (br_if $scan (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $amax (f32x4.pmax (local.get $amax) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $amax) (local.get $amax))))
        (local.set $amax (f32x4.pmax (local.get $amax) (i8x16.shuffle 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 (local.get $amax) (local.get $amax))))
        (local.set $scale (f32.div (f32x4.extract_lane 0 (local.get $amax)) (f32.const 127)))
        (f32.store (local.get $scales) (local.get $scale))
        (local.set $inv (call $inverse (local.get $scale)))
        (local.set $p (local.get $src))
        (loop $quant
          (local.set $y (f32x4.mul (v128.load (local.get $p)) (local.get $inv)))
          (local.set $r (f32x4.nearest (local.get $y)))
          (local.set $r
            (v128.bitselect
              (f32x4.add (local.get $y) (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000)) (v128.const f32x4 0.5 0.5 0.5 0.5)))
              (local.get $r)
              (f32x4.eq (f32x4.abs (f32x4.sub (local.get $y) (local.get $r))) (v128.const f32x4 0.5 0.5 0.5 0.5))))
          (local.set $c (i32x4.trunc_sat_f32x4_s (local.get $r)))
          (local.set $c (i32x4.add (local.get $c) (v128.const i32x4 128 128 128 128)))
          (local.set $c (i16x8.narrow_i32x4_s (local.get $c) (local.get $c)))
          (v128.store32_lane 0 (local.get $codes) (i8x16.narrow_i16x8_u (local.get $c) (local.get $c)))
          (local.set $codes (i32.add (local.get $codes) (i32.const 4)))
          (local.set $p (i32.add (local.get $p) (i32.const 16)))
          (br_if $quant (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $src (local.get $end))
        (local.set $scales (i32.add (local.get $scales) (i32.const 4)))
        (local.set $blocks (i32.sub (local.get $blocks) (i32.const 1)))
        (br $block))))
  ;; int4: quantizeRows's asymmetric search (q4Block in model/quantize.ts) for two blocks at once, one per f64 lane,
  ;; each lane running the reference's own double operations in its order (so its sums round the same way): the
  ;; same scales, zero points and codes, bit for bit. Its branches become lane masks: a lane whose refit stops
  ;; (Σd² = 0, or a fitted scale of 0) computes on, unused. Math.round(v ≥ 0) is floor(v) + (v − floor(v) ≥ 0.5),
  ;; exact in doubles; roundAway is that on |x|, signed back. An odd last block runs in both lanes.
  ;; Out: one code 0…15 per weight at `codes` (the caller packs nibbles), a float32 scale and a zero-point byte per
  ;; block; `tmp` holds the pair's values interleaved as doubles (16 bytes per weight of a block).
  (func $roundAway (param $x v128) (result v128)
    (local $a v128) (local $f v128)
    (local.set $a (f64x2.abs (local.get $x)))
    (local.set $f (f64x2.floor (local.get $a)))
    (v128.or
      (v128.and (local.get $x) (v128.const i64x2 0x8000000000000000 0x8000000000000000))
      (f64x2.add (local.get $f)
        (v128.and (f64x2.ge (f64x2.sub (local.get $a) (local.get $f)) (v128.const f64x2 0.5 0.5)) (v128.const f64x2 1 1)))))

  ;; Math.max(0, Math.min(15, roundAway(x) + zero))
  (func $q4Code (param $x v128) (param $zero v128) (result v128)
    (f64x2.max (v128.const f64x2 0 0) (f64x2.min (v128.const f64x2 15 15) (f64x2.add (call $roundAway (local.get $x)) (local.get $zero)))))

  (func (export "q4f32") (param $src i32) (param $blocks i32) (param $bs i32) (param $codes i32) (param $scales i32) (param $zeros i32) (param $tmp i32)
    (local $p i32) (local $a i32) (local $b i32) (local $bi i32) (local $i i32) (local $end i32) (local $t i32) (local $refit i32)
    (local $x v128) (local $lo v128) (local $hi v128) (local $sxx v128) (local $best v128) (local $outScale v128) (local $outZero v128)
    (local $valid v128) (local $active v128) (local $scale v128) (local $zero v128) (local $inv v128) (local $sxd v128) (local $sdd v128)
    (local $d v128) (local $err v128) (local $fitted v128) (local $upd v128) (local $c v128) (local $y v128) (local $ay v128) (local $fy v128)
    (local.set $end (i32.add (local.get $tmp) (i32.shl (local.get $bs) (i32.const 4))))
    (block $done
      (loop $pair
        (br_if $done (i32.ge_u (local.get $p) (local.get $blocks)))
        (local.set $bi (select (i32.add (local.get $p) (i32.const 1)) (local.get $p) (i32.lt_u (i32.add (local.get $p) (i32.const 1)) (local.get $blocks))))
        (local.set $a (i32.add (local.get $src) (i32.shl (i32.mul (local.get $p) (local.get $bs)) (i32.const 2))))
        (local.set $b (i32.add (local.get $src) (i32.shl (i32.mul (local.get $bi) (local.get $bs)) (i32.const 2))))
        ;; lo, hi (NaNs skipped), Σx², and the pair interleaved as doubles
        (local.set $lo (v128.const f64x2 0 0))
        (local.set $hi (v128.const f64x2 0 0))
        (local.set $sxx (v128.const f64x2 0 0))
        (local.set $i (local.get $tmp))
        (loop $scan
          (local.set $x (f64x2.promote_low_f32x4 (v128.load32_lane 1 (local.get $b) (v128.load32_zero (local.get $a)))))
          (v128.store (local.get $i) (local.get $x))
          (local.set $lo (v128.bitselect (local.get $x) (local.get $lo) (f64x2.lt (local.get $x) (local.get $lo))))
          (local.set $hi (v128.bitselect (local.get $x) (local.get $hi) (f64x2.gt (local.get $x) (local.get $hi))))
          (local.set $sxx (f64x2.add (local.get $sxx) (f64x2.mul (local.get $x) (local.get $x))))
          (local.set $a (i32.add (local.get $a) (i32.const 4)))
          (local.set $b (i32.add (local.get $b) (i32.const 4)))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br_if $scan (i32.lt_u (local.get $i) (local.get $end))))
        (local.set $outScale (v128.const f64x2 0 0))
        (local.set $outZero (v128.const f64x2 8 8))
        (local.set $valid (f64x2.gt (local.get $hi) (local.get $lo)))
        (local.set $best (local.get $sxx))
        ;; 6 trial scales from ×1.1 to ×0.85 of (hi − lo) / 15, then q4_0's own (t = 6)
        (local.set $t (i32.const 0))
        (loop $trial
          (if (i32.eq (local.get $t) (i32.const 6))
            (then
              (local.set $scale (f64x2.div
                (v128.bitselect (local.get $hi) (local.get $lo) (f64x2.ge (local.get $hi) (f64x2.neg (local.get $lo))))
                (v128.const f64x2 -8 -8)))
              (local.set $zero (v128.const f64x2 8 8)))
            (else
              (local.set $scale (f64x2.mul
                (f64x2.div (f64x2.sub (local.get $hi) (local.get $lo)) (v128.const f64x2 15 15))
                (f64x2.splat (f64.sub (f64.const 1.1) (f64.div (f64.mul (f64.const 0.3) (f64.convert_i32_s (local.get $t))) (f64.const 6))))))
              (local.set $zero (f64x2.max (v128.const f64x2 0 0) (f64x2.min (v128.const f64x2 15 15)
                (call $roundAway (f64x2.div (f64x2.neg (local.get $lo)) (local.get $scale))))))))
          (local.set $active (local.get $valid))
          (local.set $refit (i32.const 0))
          (loop $fit
            (local.set $inv (f64x2.div (v128.const f64x2 1 1) (local.get $scale)))
            (local.set $sxd (v128.const f64x2 0 0))
            (local.set $sdd (v128.const f64x2 0 0))
            (local.set $i (local.get $tmp))
            (loop $sum
              ;; d = q4Code(x · inv, zero) − zero, $q4Code and $roundAway written out (no call per 2 weights)
              (local.set $x (v128.load (local.get $i)))
              (local.set $y (f64x2.mul (local.get $x) (local.get $inv)))
              (local.set $ay (f64x2.abs (local.get $y)))
              (local.set $fy (f64x2.floor (local.get $ay)))
              (local.set $d (f64x2.sub
                (f64x2.max (v128.const f64x2 0 0) (f64x2.min (v128.const f64x2 15 15) (f64x2.add
                  (v128.or
                    (v128.and (local.get $y) (v128.const i64x2 0x8000000000000000 0x8000000000000000))
                    (f64x2.add (local.get $fy)
                      (v128.and (f64x2.ge (f64x2.sub (local.get $ay) (local.get $fy)) (v128.const f64x2 0.5 0.5)) (v128.const f64x2 1 1))))
                  (local.get $zero))))
                (local.get $zero)))
              (local.set $sxd (f64x2.add (local.get $sxd) (f64x2.mul (local.get $x) (local.get $d))))
              (local.set $sdd (f64x2.add (local.get $sdd) (f64x2.mul (local.get $d) (local.get $d))))
              (local.set $i (i32.add (local.get $i) (i32.const 16)))
              (br_if $sum (i32.lt_u (local.get $i) (local.get $end))))
            (local.set $active (v128.and (local.get $active) (f64x2.gt (local.get $sdd) (v128.const f64x2 0 0))))
            (local.set $err (f64x2.sub (local.get $sxx) (f64x2.div (f64x2.mul (local.get $sxd) (local.get $sxd)) (local.get $sdd))))
            (local.set $fitted (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (f64x2.div (local.get $sxd) (local.get $sdd)))))
            (local.set $upd (v128.and (local.get $active) (f64x2.lt (local.get $err) (local.get $best))))
            (local.set $best (v128.bitselect (local.get $err) (local.get $best) (local.get $upd)))
            (local.set $outScale (v128.bitselect (local.get $fitted) (local.get $outScale) (local.get $upd)))
            (local.set $outZero (v128.bitselect (local.get $zero) (local.get $outZero) (local.get $upd)))
            (local.set $active (v128.and (local.get $active) (f64x2.ne (local.get $fitted) (v128.const f64x2 0 0))))
            (local.set $scale (local.get $fitted))
            (local.set $refit (i32.add (local.get $refit) (i32.const 1)))
            (br_if $fit (i32.and (i32.lt_u (local.get $refit) (i32.const 2)) (v128.any_true (local.get $active)))))
          (local.set $t (i32.add (local.get $t) (i32.const 1)))
          (br_if $trial (i32.le_u (local.get $t) (i32.const 6))))
        ;; the codes of the best fit: inv = scale ? 1 / scale : 0
        (local.set $inv (v128.and (f64x2.div (v128.const f64x2 1 1) (local.get $outScale)) (f64x2.ne (local.get $outScale) (v128.const f64x2 0 0))))
        (local.set $a (i32.add (local.get $codes) (i32.mul (local.get $p) (local.get $bs))))
        (local.set $b (i32.add (local.get $codes) (i32.mul (local.get $bi) (local.get $bs))))
        (local.set $i (local.get $tmp))
        (loop $code
          (local.set $c (i32x4.trunc_sat_f64x2_s_zero (call $q4Code (f64x2.mul (v128.load (local.get $i)) (local.get $inv)) (local.get $outZero))))
          (i32.store8 (local.get $a) (i32x4.extract_lane 0 (local.get $c)))
          (i32.store8 (local.get $b) (i32x4.extract_lane 1 (local.get $c)))
          (local.set $a (i32.add (local.get $a) (i32.const 1)))
          (local.set $b (i32.add (local.get $b) (i32.const 1)))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br_if $code (i32.lt_u (local.get $i) (local.get $end))))
        (f32.store (i32.add (local.get $scales) (i32.shl (local.get $p) (i32.const 2))) (f32.demote_f64 (f64x2.extract_lane 0 (local.get $outScale))))
        (f32.store (i32.add (local.get $scales) (i32.shl (local.get $bi) (i32.const 2))) (f32.demote_f64 (f64x2.extract_lane 1 (local.get $outScale))))
        (local.set $c (i32x4.trunc_sat_f64x2_s_zero (local.get $outZero)))
        (i32.store8 (i32.add (local.get $zeros) (local.get $p)) (i32x4.extract_lane 0 (local.get $c)))
        (i32.store8 (i32.add (local.get $zeros) (local.get $bi)) (i32x4.extract_lane 1 (local.get $c)))
        (local.set $p (i32.add (local.get $p) (i32.const 2)))
        (br $pair)))))
