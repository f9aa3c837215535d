"""`python -m jaxcnn.summary`: a parameter table built without materialising the model."""

import subprocess
import sys

from conftest import REPO_ROOT


def run_summary(*args):
  return subprocess.run([sys.executable, '-m', 'jaxcnn.summary', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def test_resnet50_at_imagenet_size_has_the_published_count():
  result = run_summary('resnet50')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == 'resnet50: input 224,224,3, 1000 classes'
  assert lines[-2] == 'total: 25,557,032 parameters'
  # torchvision's model table: 4.09 'GFLOPS', which count multiply-adds.
  assert lines[-1] == 'forward pass: 4.09G multiply-adds per image (4,089,184,256)'
  rows = {line.split()[0]: line for line in lines[2:-2]}
  assert rows['stem_conv.kernel'].split() == ['stem_conv.kernel', '(7,', '7,', '3,', '64)', '9,408']
  # One row per parameter: 53 convolutions, 53 BatchNorms (scale and bias) and the fc's two.
  assert len(rows) == 53 + 2 * 53 + 2
  assert sum(int(row.split()[-1].replace(',', '')) for row in rows.values()) == 25_557_032


def test_every_imagenet_network_defaults_to_imagenet_input():
  """Not only the ResNets: mobilenet_v2 was summarised for 28x28x1 digits, with 2,236,106
  parameters, and convnext_tiny refused such small images, naming a flag not given."""
  result = run_summary('mobilenet_v2')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == 'mobilenet_v2: input 224,224,3, 1000 classes'
  assert result.stdout.splitlines()[-2] == 'total: 3,504,872 parameters'  # torchvision's.


def test_config_gives_model_input_shape_and_classes():
  result = run_summary('--config', 'configs/mnist.py')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == 'bn_cnn: input 28,28,1, 10 classes'
  assert result.stdout.splitlines()[-2] == 'total: 98,554 parameters'
  # Convolutions 28*28*16 * 9 + 14*14*32 * 9*16 + 7*7*64 * 9*32, fc1 3*3*64*128, fc2 128*10.
  assert result.stdout.splitlines()[-1] == (
      'forward pass: 1.99M multiply-adds per image (1,994,240)')
  result = run_summary('--config', 'configs/mnist.py',
                       "--config.model_kwargs={'widths': (8, 16), 'hidden': 32}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == ('bn_cnn with hidden=32, widths=(8, 16): input 28,28,1, '
                                           '10 classes')
  # Convolutions 1*8*9 and 8*16*9, BatchNorm 2*(8+16), fc1 (7*7*16 + 1)*32, fc2 (32 + 1)*10.
  assert result.stdout.splitlines()[-2] == f'total: {72 + 1152 + 48 + 25_120 + 330:,} parameters'
  # 28*28*8 * 9 + 14*14*16 * 9*8 + 7*7*16*32 + 32*10: the model_kwargs' model.
  assert result.stdout.splitlines()[-1] == 'forward pass: 308K multiply-adds per image (307,648)'


def test_config_overrides_and_image_size_give_the_input():
  # ImageNet's images vary in size: the config's image_size, here overridden, is the input.
  result = run_summary('--config', 'configs/imagenet_resnet50.py', '--config.image_size=160')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == 'resnet50: input 160,160,3, 1000 classes'
  assert result.stdout.splitlines()[-2] == 'total: 25,557,032 parameters'
  result = run_summary('--config', 'configs/mnist.py', '--config.image_sise=32')
  assert result.returncode == 2
  assert result.stderr.startswith(
      "error: unknown config key 'image_sise'; did you mean 'image_size'")
  assert result.stderr.count('\n') == 1


def test_flags_override_the_defaults():
  result = run_summary('cifar_resnet20', '--input_shape', '28,28,1', '--num_classes', '100')
  assert result.returncode == 0, result.stderr
  # 269,722 for RGB and 10 classes: 2 * 9 * 16 fewer in the first conv, 90 * 65 more in the fc.
  assert result.stdout.splitlines()[-2] == f'total: {269_722 - 288 + 90 * 65:,} parameters'


def test_bad_model_name_is_one_line_error():
  result = run_summary('resnet9000')
  assert result.returncode == 2
  assert result.stderr.startswith("error: unknown model 'resnet9000'; choose one of: ")
  assert result.stderr.count('\n') == 1 and not result.stdout


def test_images_too_small_name_the_flag_that_was_given():
  result = run_summary('bn_cnn', '--input_shape', '4,4,1')
  assert result.returncode == 2
  assert result.stderr == ("error: model 'bn_cnn' cannot be built for 4x4x1 images (its "
                           'downsampling leaves nothing of them); it needs larger images '
                           '(--input_shape)\n')


def test_model_and_config_model_naming_different_models_is_refused():
  result = run_summary('lenet5', '--config', 'configs/mnist.py', '--config.model=cifar_resnet20')
  assert result.returncode == 2 and not result.stdout
  assert result.stderr == ("error: MODEL 'lenet5' and --config.model='cifar_resnet20' name "
                           "different models; give one of them\n")
  # The same model named both ways, or MODEL against the config file's own model, is no conflict.
  for args in (('lenet5', '--config.model=lenet5'), ('lenet5',)):
    result = run_summary(args[0], '--config', 'configs/mnist.py', *args[1:])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == 'lenet5: input 28,28,1, 10 classes'


def test_an_image_folder_config_needs_no_folder():
  # Only the shape is needed: that of the synthetic stand-in a smoke run uses, at image_size.
  result = run_summary('--config', 'configs/imagefolder.py', '--config.image_size=48')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == 'cifar_resnet20: input 48,48,3, 10 classes'
  assert result.stdout.splitlines()[-2] == 'total: 269,722 parameters'


def test_a_configs_frozen_parameters_are_marked_so_a_pattern_is_checked_before_a_run():
  result = run_summary('--config', 'configs/mnist.py', r'--config.frozen=^(?!fc2\.)')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  marked = {line.split()[0] for line in lines[2:-2] if line.endswith('  frozen')}
  rows = {line.split()[0] for line in lines[2:-2]}
  assert rows - marked == {'fc2.bias', 'fc2.kernel'}
  assert lines[-2] == f'total: 98,554 parameters, {98_554 - 1_290:,} of them frozen'
  result = run_summary('--config', 'configs/mnist.py', '--config.frozen=head')  # No such name.
  assert result.stdout.splitlines()[-2] == 'total: 98,554 parameters, 0 of them frozen'
  result = run_summary('--config', 'configs/mnist.py', '--config.frozen=(')
  assert (result.returncode, result.stderr) == (2, (
      "error: config key 'frozen' ('(') is not a regular expression: missing ), unterminated "
      'subpattern at position 0\n'))
